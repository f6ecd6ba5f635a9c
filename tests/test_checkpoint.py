"""Checkpoints: atomic writes, damage detection, safe loading on every path, the choice of the checkpoint to
resume from, and pruning of periodic ones."""

import logging
import os
import pickle

import pytest
import torch
from omegaconf import OmegaConf

from ddpm.config.errors import CheckpointError, ConfigError
from ddpm.diffusion.build import load_diffusion
from ddpm.io.checkpoint import (
    load_checkpoint,
    periodic_checkpoints,
    periodic_name,
    prune_periodic,
    remove_temporaries,
    save_checkpoint,
)
from ddpm.training.resume import check_resumable, find_resume_checkpoint


def a_state(step: int = 7, **extra) -> dict:
    return {"model": {"w": torch.arange(1000.0)}, "step": step, "config": {"a": [1, 2]}, **extra}


def test_round_trip_and_no_temporary_files_left(tmp_path):
    save_checkpoint(tmp_path / "last.pt", a_state())
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    loaded = load_checkpoint(tmp_path / "last.pt")
    assert loaded["step"] == 7 and torch.equal(loaded["model"]["w"], torch.arange(1000.0))


def test_a_checkpoint_is_an_ordinary_file_readable_as_the_umask_allows(tmp_path):
    previous = os.umask(0o022)
    try:
        save_checkpoint(tmp_path / "last.pt", a_state())
    finally:
        os.umask(previous)
    assert (tmp_path / "last.pt").stat().st_mode & 0o777 == 0o644


def test_the_periodic_copy_has_the_same_contents(tmp_path):
    save_checkpoint(tmp_path / "last.pt", a_state(10), also=(tmp_path / periodic_name(10),))
    assert (tmp_path / "step_0000010.pt").read_bytes() == (tmp_path / "last.pt").read_bytes()
    save_checkpoint(tmp_path / "last.pt", a_state(11))  # replacing last.pt leaves the periodic file alone
    assert load_checkpoint(tmp_path / "step_0000010.pt")["step"] == 10
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 11


def test_a_failed_write_leaves_the_previous_checkpoint_and_no_temporary(tmp_path):
    save_checkpoint(tmp_path / "last.pt", a_state(1))
    with pytest.raises((pickle.PicklingError, AttributeError)):
        save_checkpoint(tmp_path / "last.pt", a_state(2, broken=lambda: None))  # lambdas cannot be pickled
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_errors_name_the_path(tmp_path):
    with pytest.raises(CheckpointError, match="missing.pt does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"weights": torch.ones(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"other.pt is not a ddpm checkpoint.*\['weights'\]"):
        load_checkpoint(tmp_path / "other.pt")


def test_a_truncated_checkpoint_is_detected(tmp_path):
    save_checkpoint(tmp_path / "last.pt", a_state())
    data = (tmp_path / "last.pt").read_bytes()
    (tmp_path / "last.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="last.pt is truncated"):
        load_checkpoint(tmp_path / "last.pt")


def test_an_empty_file_a_directory_and_another_format_are_named_as_what_they_are(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty.pt is empty \(0 bytes\)"):
        load_checkpoint(tmp_path / "empty.pt")
    (tmp_path / "folder.pt").mkdir()
    with pytest.raises(CheckpointError, match="folder.pt is a directory"):
        load_checkpoint(tmp_path / "folder.pt")
    (tmp_path / "image.pt").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(CheckpointError, match="image.pt is not a checkpoint: it holds a PNG image"):
        load_checkpoint(tmp_path / "image.pt")


def test_a_checkpoint_without_a_digest_loads_only_when_trusted(tmp_path):
    torch.save(a_state(), tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="plain.pt carries no digest.*trust_checkpoint=true"):
        load_checkpoint(tmp_path / "plain.pt")
    assert load_checkpoint(tmp_path / "plain.pt", trust=True)["step"] == 7


def test_flipped_bits_in_the_weights_are_detected(tmp_path):
    """The zip archive still opens and the tensor still loads; only the stored digest can tell."""
    save_checkpoint(tmp_path / "last.pt", a_state())
    data = bytearray((tmp_path / "last.pt").read_bytes())
    offset = data.find(torch.arange(1000.0).numpy().tobytes()[400:408])
    assert offset > 0
    data[offset] ^= 0x40
    (tmp_path / "last.pt").write_bytes(bytes(data))
    assert not torch.equal(torch.load(tmp_path / "last.pt", weights_only=True)["model"]["w"], torch.arange(1000.0))
    with pytest.raises(CheckpointError, match="last.pt is corrupted"):
        load_checkpoint(tmp_path / "last.pt")


class WritesAFile:
    """Unpickling this would run code (create a file); weights_only loading must refuse it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def malicious_checkpoint(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "checkpoints" / "last.pt"
    path.parent.mkdir()
    with open(path, "wb") as file:
        torch.save({"model": WritesAFile(str(marker)), "step": 1, "config": {}}, file, pickle_module=pickle)
    yield path
    assert not marker.exists(), "unpickling the checkpoint ran code"


RUNS_CODE = "holds objects other than tensors and plain values, which are not loaded"


def test_loading_refuses_a_checkpoint_that_would_run_code(malicious_checkpoint):
    with pytest.raises(CheckpointError, match=RUNS_CODE):
        load_checkpoint(malicious_checkpoint)


def test_sampling_refuses_a_checkpoint_that_would_run_code(malicious_checkpoint):
    with pytest.raises(CheckpointError, match=RUNS_CODE):
        load_diffusion(malicious_checkpoint)


def test_resuming_refuses_a_checkpoint_that_would_run_code(malicious_checkpoint):
    with pytest.raises(CheckpointError, match=RUNS_CODE):
        find_resume_checkpoint(str(malicious_checkpoint), malicious_checkpoint.parent)
    with pytest.raises(CheckpointError, match="no checkpoint in .* is an intact one of this run \\(last.pt damaged"):
        find_resume_checkpoint("auto", malicious_checkpoint.parent)


# ------------------------------------------------------------------------------------ the resume choice


def write_run(directory, steps, last):
    for step in steps:
        save_checkpoint(directory / periodic_name(step), a_state(step))
    save_checkpoint(directory / "last.pt", a_state(last))


def test_auto_takes_last_and_never_takes_nothing(tmp_path):
    assert find_resume_checkpoint("auto", tmp_path) is None  # a new run directory
    write_run(tmp_path, [10, 20], last=25)
    path, state = find_resume_checkpoint("auto", tmp_path)
    assert path.name == "last.pt" and state["step"] == 25
    assert find_resume_checkpoint("never", tmp_path) is None
    path, state = find_resume_checkpoint(str(tmp_path / periodic_name(10)), tmp_path)
    assert state["step"] == 10


def test_auto_falls_back_to_the_newest_intact_checkpoint_and_says_so(tmp_path, caplog):
    write_run(tmp_path, [10, 20, 30], last=30)
    (tmp_path / "last.pt").write_bytes(b"damaged")
    data = (tmp_path / periodic_name(30)).read_bytes()
    (tmp_path / periodic_name(30)).write_bytes(data[:-100])
    with caplog.at_level(logging.WARNING):
        path, state = find_resume_checkpoint("auto", tmp_path)
    assert path.name == "step_0000020.pt" and state["step"] == 20
    assert "resuming from" in caplog.text and "last.pt, step_0000030.pt" in caplog.text


def test_an_explicit_damaged_checkpoint_is_an_error_naming_the_key(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"damaged")
    with pytest.raises(CheckpointError, match=r"trainer.resume=.*last.pt is not a checkpoint: it holds text"):
        find_resume_checkpoint(str(tmp_path / "last.pt"), tmp_path)


def test_resuming_needs_training_state_and_the_same_model(tmp_path, caplog):
    config = {
        "model": {"base_channels": 16},
        "dataset": {"root": "/data"},
        "trainer": {"iterations": 10, "use_labels": True},
    }
    state = {**a_state(), "config": config, "optimizer": {}, "loop": {}, "data": {}, "rng": {}}
    check_resumable(tmp_path, state, config)
    with pytest.raises(CheckpointError, match="no training state"):
        check_resumable(tmp_path, a_state(config=config), config)
    other_model = {**config, "model": {"base_channels": 32}}
    with pytest.raises(ConfigError, match="model.base_channels=32, but trainer.resume=.* with model.base_channels=16"):
        check_resumable(tmp_path, state, other_model)
    with pytest.raises(ConfigError, match="trainer.use_labels=False"):
        check_resumable(tmp_path, state, {**config, "trainer": {"iterations": 10, "use_labels": False}})
    check_resumable(tmp_path, state, {**config, "dataset": {"root": "/elsewhere"}})  # the data moved: fine
    with caplog.at_level(logging.WARNING):
        check_resumable(tmp_path, state, {**config, "trainer": {"iterations": 20, "use_labels": True}})
    assert "trainer.iterations: 10 -> 20" in caplog.text


def test_a_training_config_holds_only_what_training_reads_so_resume_warns_only_about_real_changes(tmp_path, caplog):
    """The settings of task=sample/evaluate/benchmark live in their task configs: a training run's resolved
    config (and so its checkpoint) does not carry them, and moving the outputs or changing the logger between a
    run and its resume is no change of the result."""
    from conftest import compose_config

    config = OmegaConf.to_container(compose_config("experiment=quickstart"), resolve=True)
    assert not {"sample", "eval", "benchmark", "checkpoint"} & set(config)
    assert {"sample", "checkpoint"} <= set(compose_config("task=sample"))
    assert {"eval", "checkpoint"} <= set(compose_config("task=evaluate"))
    state = {**a_state(), "config": config, "optimizer": {}, "loop": {}, "data": {}, "rng": {}}
    moved = {**config, "paths": {**config["paths"], "output_dir": "/elsewhere"}, "logger": {"_target_": "x"}}
    with caplog.at_level(logging.WARNING):
        check_resumable(tmp_path, state, moved)
    assert "changed settings" not in caplog.text
    with caplog.at_level(logging.WARNING):
        check_resumable(tmp_path, state, {**config, "optimizer": {**config["optimizer"], "lr": 1.0}})
    assert "optimizer.lr" in caplog.text


def test_a_checkpoint_written_before_a_model_option_existed_still_resumes_and_a_real_change_is_still_refused(tmp_path):
    """Options added to the UNet later (norm_eps, downsample_padding, ...) are absent from an older checkpoint's
    config; their defaults are what it was trained with, so the same run continues, and setting one otherwise is
    a change of the network."""
    from conftest import compose_config

    config = OmegaConf.to_container(compose_config("experiment=quickstart"), resolve=True)
    added = ("norm_eps", "downsample_padding", "up_attention_resolutions", "time_embedding_order")
    older = {**config, "model": {k: v for k, v in config["model"].items() if k not in added}}
    state = {**a_state(), "config": older, "optimizer": {}, "loop": {}, "data": {}, "rng": {}}
    check_resumable(tmp_path, state, config)
    with pytest.raises(ConfigError, match="model.norm_eps=1e-06, but trainer.resume=.* with model.norm_eps=1e-05"):
        check_resumable(tmp_path, state, {**config, "model": {**config["model"], "norm_eps": 1e-6}})


# ------------------------------------------------------------------------------------------ housekeeping


def test_pruning_keeps_the_newest_periodic_checkpoints(tmp_path):
    write_run(tmp_path, [5, 10, 15, 20], last=20)
    removed = prune_periodic(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == ["step_0000005.pt", "step_0000010.pt"]
    assert [p.name for p in periodic_checkpoints(tmp_path)] == ["step_0000020.pt", "step_0000015.pt"]
    assert prune_periodic(tmp_path, keep=0) == []  # 0 keeps all
    assert (tmp_path / "last.pt").is_file()


def test_leftovers_of_an_interrupted_write_are_removed(tmp_path):
    write_run(tmp_path, [], last=3)
    (tmp_path / ".last.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / "notes.tmp").write_text("not ours")
    assert [p.name for p in remove_temporaries(tmp_path)] == [".last.pt.abc123.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "notes.tmp"]
