"""A run killed with SIGKILL (or stopped by SIGTERM or SIGINT) and started again with the same command ends bit-identical to a run that was
never interrupted: weights, EMA, optimizer, random streams, data position and the logged losses.

Each scenario runs `python main.py` in subprocesses (tiny model with dropout, digits, CPU), as a user would.
"""

import json
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import PROJECT_ROOT, TINY_QUICKSTART, run_main, user_environment
from main_in_process import run_main_in_process

from ddpm.io.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow

ITERATIONS = 60
CHECKPOINT_RATE = 12  # not a multiple of the log rate: a resume starts in the middle of a log interval
TINY = [
    *TINY_QUICKSTART,
    "model.dropout=0.1",  # draws from the global random stream at every step
    "schedule.num_timesteps=100",
    f"trainer.iterations={ITERATIONS}",
    "trainer.batch_size=16",
    "trainer.log_rate=5",
    f"trainer.checkpoint_rate={CHECKPOINT_RATE}",
    "trainer.keep_checkpoints=2",
    "trainer.test_batches=1",
    "trainer.sample_at_end=false",
]
# Values that depend on the clock or on the logger rather than on the computation.
NOT_COMPARED = {"images_per_s", "wall_time_s"}


def start_main(*args: str, runner: str | None = None) -> subprocess.Popen:
    env = user_environment()
    command = (
        [sys.executable, "-c", runner, *args] if runner else [sys.executable, str(PROJECT_ROOT / "main.py"), *args]
    )
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=PROJECT_ROOT
    )


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"main.py ended before {path} appeared:\n{process.stdout.read()}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.005)


def metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in NOT_COMPARED} for row in rows]


def assert_identical(a, b, where: str = "checkpoint") -> None:
    """torch.equal on every tensor, == on everything else, through nested dicts, lists and tuples."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{where}: keys {sorted(set(a) ^ set(b))} differ"
        for key in a:
            if key not in NOT_COMPARED:
                assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths differ"
        for index, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{where}[{index}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def final_state(run_dir: Path) -> dict:
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    state["config"].pop("logger")  # the scenarios may log differently; the computation is what must match
    state.pop("logger")
    state.pop("run_id")  # which run wrote it, not what was computed
    return state


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    run_main(*TINY, f"hydra.run.dir={run_dir}")
    return run_dir


def check_same_as_uninterrupted(run_dir: Path, uninterrupted: Path, resumed_from: int) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == ITERATIONS and summary["resumed_from_step"] == resumed_from
    assert_identical(final_state(run_dir), final_state(uninterrupted))
    reference, resumed = metrics(uninterrupted), metrics(run_dir)
    assert [row["step"] for row in resumed] == list(range(5, ITERATIONS + 1, 5))
    assert any(row["step"] > resumed_from for row in resumed)
    assert resumed == reference  # train/test loss, gradient norm and lr at every log step, also after the resume
    periodic = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*.pt"))
    assert periodic == ["step_0000048.pt", "step_0000060.pt"]  # trainer.keep_checkpoints=2
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))


def test_a_run_killed_at_a_random_moment_resumes_bit_identical(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    command = [*TINY, f"hydra.run.dir={run_dir}"]
    training_time = json.loads((uninterrupted / "summary.json").read_text())["wall_time_s"]
    seed = random.randrange(1 << 30)
    delay = random.Random(seed).uniform(0, 0.6) * training_time
    for _ in range(4):  # on a machine much faster than expected the run may end before the kill lands
        process = start_main(*command)
        wait_for(run_dir / "checkpoints" / "last.pt", process)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.communicate()
        if (
            process.returncode == -signal.SIGKILL
            and load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] < ITERATIONS
        ):
            break
        delay /= 4
    else:
        pytest.fail(f"the run always finished before it could be killed (seed {seed})")
    killed_at = load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"]

    run_main(*command)  # the same command again: it must continue, not restart
    check_same_as_uninterrupted(run_dir, uninterrupted, resumed_from=killed_at)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_and_sigint_finish_the_step_write_a_checkpoint_and_the_run_resumes_bit_identical(
    signum, uninterrupted, tmp_path
):
    run_dir = tmp_path / "run"
    command = [*TINY, f"hydra.run.dir={run_dir}"]
    process = start_main(*command)
    wait_for(run_dir / "checkpoints" / "step_0000012.pt", process)
    process.send_signal(signum)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 128 + signum, output  # 143 for SIGTERM, 130 for SIGINT, as shells report them
    assert "Traceback" not in output, output
    [line] = [line for line in output.splitlines() if f"by {signal.Signals(signum).name}" in line]
    stopped_at = load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"]
    assert f"stopped at step {stopped_at} by {signal.Signals(signum).name}" in line, output
    assert str(run_dir / "checkpoints" / "last.pt") in line and "the same command" in line, output
    assert 12 <= stopped_at < ITERATIONS

    run_main(*command)  # the same command again continues from the step the signal stopped at
    check_same_as_uninterrupted(run_dir, uninterrupted, resumed_from=stopped_at)


# bf16 autocast on the CPU, what precision=auto picks on CPUs with bf16 matrix units; on CPUs without them it
# is emulated, many times slower, so the network is narrower and the batch smaller.
BF16 = [
    *(a for a in TINY if not a.startswith(("model.base_channels=", "trainer.batch_size="))),
    "model.base_channels=4",
    "trainer.batch_size=8",
    "trainer.precision=bf16",
]


@pytest.fixture(scope="module")
def uninterrupted_bf16(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted_bf16")
    run_main(*BF16, f"hydra.run.dir={run_dir}")
    return run_dir


def test_a_bf16_run_on_cpu_killed_after_a_checkpoint_resumes_bit_identical(uninterrupted_bf16, tmp_path):
    run_dir = tmp_path / "run"
    command = [*BF16, f"hydra.run.dir={run_dir}"]
    process = start_main(*command)
    wait_for(run_dir / "checkpoints" / "step_0000024.pt", process)
    process.send_signal(signal.SIGKILL)
    output, _ = process.communicate()
    assert "precision=bf16" in output
    killed_at = load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"]
    assert 24 <= killed_at < ITERATIONS

    run_main(*command)
    check_same_as_uninterrupted(run_dir, uninterrupted_bf16, resumed_from=killed_at)


# Runs main.py with torch.save replaced by one that writes half of the third checkpoint and then kills its own
# process: the kill lands during the write, after the temporary file exists and before the rename.
DIE_DURING_THIRD_SAVE = textwrap.dedent(
    """
    import io, os, runpy, signal, sys
    import torch
    real_save, calls = torch.save, []

    def save(state, file, *args, **kwargs):
        calls.append(1)
        if len(calls) < 3:
            return real_save(state, file, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(state, buffer, *args, **kwargs)
        file.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        file.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    torch.save = save
    sys.argv = ["main.py", *sys.argv[1:]]
    runpy.run_path("main.py", run_name="__main__")
    """
)


def test_a_run_killed_while_writing_a_checkpoint_resumes_bit_identical(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    command = [*TINY, "logger=wandb", "logger.mode=offline", f"hydra.run.dir={run_dir}"]
    process = start_main(*command, runner=DIE_DURING_THIRD_SAVE)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == -signal.SIGKILL, output
    checkpoints = run_dir / "checkpoints"
    assert len(list(checkpoints.glob(".last.pt.*.tmp"))) == 1  # the half-written file
    assert load_checkpoint(checkpoints / "last.pt")["step"] == 2 * CHECKPOINT_RATE  # the last complete one

    result = run_main(*command)
    assert "removed .last.pt." in result.stdout + result.stderr
    check_same_as_uninterrupted(run_dir, uninterrupted, resumed_from=2 * CHECKPOINT_RATE)
    # wandb continues the same run: both processes wrote under one run id.
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({path.name.rsplit("-", 1)[1] for path in runs}) == 1


def test_resume_never_starts_over_and_a_finished_run_is_not_trained_further(tmp_path, capfd):
    run_dir = tmp_path / "run"
    short = [*TINY, "trainer.iterations=24", f"hydra.run.dir={run_dir}"]
    assert run_main_in_process(short, capfd)[0] == 0
    first = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    code, again = run_main_in_process(short, capfd)  # resume=auto at the end of the run: nothing left to train
    assert code == 0 and f"the run in {run_dir} finished at step 24: nothing to do" in again, again
    assert_identical(load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"], first["model"])
    code, fresh = run_main_in_process([*short, "trainer.resume=never"], capfd)
    assert code == 0 and "resuming" not in fresh, fresh
    assert json.loads((run_dir / "summary.json").read_text())["resumed_from_step"] is None
    assert [row["step"] for row in metrics(run_dir)] == [5, 10, 15, 20]
