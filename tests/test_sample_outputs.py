"""task=sample's outputs have one owner: a folder holds one command's images, whole, or stays as it was.

Two commands into one sample.out_dir both ended with status 0, the second overwriting the first's files; ten
images into a folder of a hundred replaced the npz and PNGs 0-9 and left PNGs 10-99; SIGTERM killed the process
without a line after it had overwritten part of an earlier command's PNGs.
"""

import hashlib
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from main_in_process import SAMPLE, command, run_main_in_process
from test_fault_catalogue import EVALUATE
from test_resume import start_main, wait_for


def folder_digests(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not path.name.startswith(".")
    }


def sample(runs, out_dir: Path, tmp_path: Path, *overrides: str) -> list[str]:
    checkpoint = runs["cond_run"] / "checkpoints" / "last.pt"
    base = [*SAMPLE, f"checkpoint={checkpoint}", f"sample.out_dir={out_dir}"]
    return command(base, [f"hydra.run.dir={tmp_path / 'run'}", *overrides], {})


def test_a_second_command_is_refused_and_replacing_moves_the_first_ones_files_aside(runs, tmp_path, capfd):
    out_dir = tmp_path / "gen"
    assert run_main_in_process(sample(runs, out_dir, tmp_path, "sample.num_images=6"), capfd)[0] == 0
    first = folder_digests(out_dir)
    assert sorted(first) == [*(f"{i:06d}_class{i % 10}.png" for i in range(6)), "samples.npz"]

    code, output = run_main_in_process(sample(runs, out_dir, tmp_path, "sample.num_images=2"), capfd)
    assert code == 1 and "Traceback" not in output
    assert f"sample.out_dir={out_dir} holds an earlier command's outputs (" in output
    assert "set sample.replace=true to move them aside" in output
    assert folder_digests(out_dir) == first

    replaced = sample(runs, out_dir, tmp_path, "sample.num_images=2", "sample.replace=true", "sample.seed=5")
    assert run_main_in_process(replaced, capfd)[0] == 0
    [earlier] = (out_dir / "previous").iterdir()
    assert folder_digests(earlier) == first  # the first command's files, whole, moved aside
    now = [name for name in folder_digests(out_dir) if not name.startswith("previous/")]
    assert len(now) == 3 and "samples.npz" in now  # two PNGs and the npz: the folder and the npz agree
    assert np.load(out_dir / "samples.npz")["arr_0"].shape[0] == 2
    assert not (out_dir / ".writing").exists()


@pytest.mark.slow
def test_sigterm_while_sampling_ends_in_one_line_and_leaves_the_folder_as_it_was(runs, tmp_path, capfd):
    out_dir = tmp_path / "gen"
    assert run_main_in_process(sample(runs, out_dir, tmp_path, "sample.num_images=2"), capfd)[0] == 0
    first = folder_digests(out_dir)
    # Many small batches: the first PNG is staged long before the last.
    long = sample(runs, out_dir, tmp_path, "sample.num_images=400", "sample.batch_size=1", "sample.replace=true")
    second = sample(runs, out_dir, tmp_path, "sample.num_images=2", "sample.replace=true")

    def meanwhile():
        code, output = run_main_in_process(command(second, [f"hydra.run.dir={tmp_path / 'run2'}"], {}), capfd)
        assert code == 1 and f"sample.out_dir={out_dir.resolve()} is in use by" in output  # one owner at a time

    process, output = terminated(start_main(*long), out_dir / ".writing" / "000000_class0.png", meanwhile)
    assert process.returncode == 143, output
    assert f"received SIGTERM while sampling: stopping now; sample.out_dir={out_dir} is as it was" in output
    assert "Traceback" not in output
    assert folder_digests(out_dir) == first and not (out_dir / ".writing").exists()


@pytest.mark.slow
def test_sigterm_during_an_evaluation_ends_in_one_line(runs, tmp_path):
    """SIGTERM while task=evaluate drew its images (or computed reference statistics) ended it with no line."""
    run_dir = tmp_path / "evaluation"
    checkpoint = runs["cond_run"] / "checkpoints" / "last.pt"
    process = start_main(
        *command(EVALUATE, [f"checkpoint={checkpoint}", "eval.num_samples=4000", "eval.batch_size=1"], {}),
        f"hydra.run.dir={run_dir}",
    )
    process, output = terminated(process, run_dir / ".hydra" / "config.yaml", lambda: time.sleep(3))  # drawing
    assert process.returncode == 143, output
    assert "received SIGTERM during the evaluation: stopping now; the files it wrote so far are whole" in output
    assert "Traceback" not in output and not (run_dir / "metrics.json").exists()


def terminated(process, started: Path, meanwhile) -> tuple:
    """SIGTERM to `process` once `started` exists and `meanwhile()` has run; the process and its output."""
    try:
        wait_for(started, process)
        meanwhile()
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    return process, output
