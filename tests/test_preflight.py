"""Preflight: a run directory that cannot be written, or a disk too full for a checkpoint, stops the run
before its first step with a message naming the directory."""

import errno
import os
import shutil
from collections import namedtuple

import pytest
import torch
from conftest import TINY_QUICKSTART
from main_in_process import run_main_in_process

from ddpm.config.errors import StorageError
from ddpm.runtime.preflight import MB, check_storage, estimated_checkpoint_bytes

Usage = namedtuple("Usage", "total used free")


def test_a_writable_directory_with_room_passes_and_keeps_nothing(tmp_path):
    check_storage(tmp_path / "checkpoints", checkpoint_bytes=MB, keep=5)
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_a_full_disk_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(100 * MB, 99 * MB, MB))
    with pytest.raises(StorageError, match=r"checkpoints has 1 MB free, but a checkpoint takes about 10 MB"):
        check_storage(tmp_path / "checkpoints", checkpoint_bytes=10 * MB, keep=5)


def test_a_path_that_cannot_be_a_directory_is_refused(tmp_path):
    (tmp_path / "checkpoints").write_text("a file where the checkpoint directory should be")
    with pytest.raises(StorageError, match=r"checkpoints is a file, not a directory"):
        check_storage(tmp_path / "checkpoints", checkpoint_bytes=MB, keep=0)


def test_a_read_only_directory_is_refused(tmp_path, monkeypatch):
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    if os.geteuid() != 0:  # permissions bind every user but root
        directory.chmod(0o500)
    else:  # as root, stand in for a read-only file system

        def read_only(*args, **kwargs):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))

        monkeypatch.setattr(os, "write", read_only)
    try:
        with pytest.raises(StorageError, match=r"checkpoints cannot be written \((Permission denied|Read-only)"):
            check_storage(directory, checkpoint_bytes=MB, keep=0)
    finally:
        directory.chmod(0o700)


def test_the_estimate_counts_weights_ema_and_two_optimizer_moments():
    model = torch.nn.Linear(1000, 1000)  # 1,001,000 float32 parameters
    assert estimated_checkpoint_bytes(model, with_ema=True) == 4 * 4 * 1_001_000 + MB
    assert estimated_checkpoint_bytes(model, with_ema=False) == 3 * 4 * 1_001_000 + MB


TINY = [*TINY_QUICKSTART, "trainer.iterations=4"]


def test_main_stops_before_the_first_step_when_the_run_directory_cannot_hold_a_checkpoint(tmp_path, capfd, monkeypatch):
    (tmp_path / "blocked" / "checkpoints").parent.mkdir()
    (tmp_path / "blocked" / "checkpoints").write_text("not a directory")
    code, output = run_main_in_process([*TINY, f"hydra.run.dir={tmp_path / 'blocked'}"], capfd)
    assert code == 1 and "checkpoints is a file, not a directory" in output and "Traceback" not in output, output
    assert not (tmp_path / "blocked" / "metrics.jsonl").exists()

    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 10**9, 0))  # a full disk
    code, output = run_main_in_process([*TINY, f"hydra.run.dir={tmp_path / 'full'}"], capfd)
    assert code == 1 and "has 0 MB free" in output and "Traceback" not in output, output
    assert not (tmp_path / "full" / "metrics.jsonl").exists() and not list((tmp_path / "full").glob("checkpoints/*"))
