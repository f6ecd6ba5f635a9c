"""`python main.py ...` run in this process, as Hydra runs it from the command line (a second or so a command
rather than the seconds of a new interpreter), and the two tiny training runs whose checkpoints the bad-input and
fault tests check are left byte for byte as they were."""

import contextlib
import hashlib
import logging
import runpy
import sys
from pathlib import Path

import pytest
from conftest import PROJECT_ROOT, TINY_QUICKSTART
from hydra.core.global_hydra import GlobalHydra

# The runs the cases work against: a tiny version of experiment=quickstart (digits, CPU), 2 steps.
RUN = [
    *TINY_QUICKSTART,
    "schedule.num_timesteps=50",
    "trainer.iterations=2",
    "trainer.batch_size=4",
    "trainer.checkpoint_rate=1",
    "trainer.log_rate=2",
    "trainer.test_batches=1",
    "trainer.sample_at_end=false",
]
# A sampling command that would work (with checkpoint={cond}); cases add or replace overrides.
SAMPLE = ["task=sample", "logger=none", "sample.num_images=2", "sample.batch_size=2", "sample.device=cpu"]
PLOT = ["task=plot_schedules", "logger=none"]


def command(base: list[str], overrides: list[str], paths: dict[str, Path]) -> list[str]:
    """`base` + `overrides`, an override replacing the base's value of the same key; {name} -> paths[name]."""
    merged = {arg.split("=", 1)[0]: arg for arg in base}
    merged.update({arg.split("=", 1)[0]: arg for arg in overrides})
    return [arg.format(**paths) for arg in merged.values()]


@contextlib.contextmanager
def main_py(args: list[str]):
    """Runs `python main.py ARGS...` in this process (without HYDRA_FULL_ERROR, as users run it), then undoes
    what Hydra changed process-wide: its global state and the root logger's handlers."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    GlobalHydra.instance().clear()
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(sys, "argv", ["main.py", *args])
        monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
        try:
            yield lambda: runpy.run_path(str(PROJECT_ROOT / "main.py"), run_name="__main__")
        finally:
            GlobalHydra.instance().clear()
            for handler in set(root.handlers) - set(handlers):
                handler.close()
            root.handlers[:] = handlers
            root.setLevel(level)


def run_main_in_process(args: list[str], capfd) -> tuple[int, str]:
    """`python main.py ARGS...` in this process: its exit status and everything it printed."""
    code = 0
    with main_py(args) as run:
        try:
            run()
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else 1
    captured = capfd.readouterr()
    return code, captured.out + captured.err


def run_in_process(*args: str) -> None:
    """`python main.py ARGS...` in this process, for a test of what a run writes; raises if it fails."""
    with main_py(list(args)) as run:
        try:
            run()
        except SystemExit as exit:
            raise AssertionError(f"main.py {' '.join(args)} exited with status {exit.code}") from None


def train_tiny_run(run_dir: Path, *overrides: str) -> Path:
    """Trains RUN (2 steps: checkpoints/step_0000001.pt, step_0000002.pt, last.pt) into run_dir, in this process."""
    with main_py([*RUN, *overrides, f"hydra.run.dir={run_dir}"]) as run:
        run()
    assert (run_dir / "checkpoints" / "last.pt").is_file(), f"the tiny training run in {run_dir} wrote no last.pt"
    return run_dir


def checkpoint_files(runs: dict[str, Path]) -> dict[str, tuple[str, int]]:
    """SHA-256 and mtime of every file in the runs' checkpoints/ folders."""
    return {
        str(path): (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
        for run_dir in runs.values()
        for path in sorted((run_dir / "checkpoints").iterdir())
    }
