"""Data-parallel training without SLURM: `torchrun --nproc_per_node=2 main.py ...` on CPU (gloo) trains like
one process with the same global batch, and its ranks agree."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import PROJECT_ROOT, TINY_QUICKSTART, comparable, run_main, user_environment

from ddpm.config.errors import ConfigError
from ddpm.io.checkpoint import load_checkpoint
from ddpm.runtime.distributed import Ranks, local_batch_size

ARGS = [
    *TINY_QUICKSTART,
    "schedule.num_timesteps=50",
    "trainer.iterations=6",
    "trainer.batch_size=16",
    "trainer.log_rate=3",
    "trainer.checkpoint_rate=3",
    "trainer.test_batches=1",
    "trainer.sample_at_end=false",
]


def test_the_global_batch_is_shared_evenly():
    assert local_batch_size(128, Ranks(0, 4, 0)) == 32
    with pytest.raises(ConfigError, match="trainer.batch_size=10 is the global batch"):
        local_batch_size(10, Ranks(0, 4, 0))


@pytest.mark.slow
def test_torchrun_with_two_ranks_matches_one_process(tmp_path):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=29533",
        str(PROJECT_ROOT / "main.py"),
        *ARGS,
        f"hydra.run.dir={tmp_path / 'two'}",
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=user_environment(), timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    run_main(*ARGS, f"hydra.run.dir={tmp_path / 'one'}")

    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2 and len(set(summary["rank_weight_digests"])) == 1
    two = load_checkpoint(tmp_path / "two" / "checkpoints" / "last.pt")
    one = load_checkpoint(tmp_path / "one" / "checkpoints" / "last.pt")
    for name in one["model"]:  # the same batches and noise; only the order of the gradient sums differs
        torch.testing.assert_close(
            comparable(name, two["model"][name]), comparable(name, one["model"][name]), rtol=1e-3, atol=1e-3, msg=name
        )
    logged = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [row["train_loss"] for row in logged] == pytest.approx([row["train_loss"] for row in reference], rel=1e-4)


def _agree_on_stopping(rank: int, init_file: str, signalled_rank: int, signal_at: int, results: str) -> None:
    """One rank of test_every_rank_learns_of_a_stop_at_the_same_step: 12 steps, a signal at one rank."""
    import types

    import torch.distributed as dist

    from ddpm.training.preemption import StopAgreement

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    stop_signal = types.SimpleNamespace(requested=False)  # stands in for StopSignal: set "when the signal came"
    agreement = StopAgreement(stop_signal, Ranks(rank, 2, rank))
    stopped_at = None
    for step in range(1, 13):
        if rank == signalled_rank and step == signal_at:
            stop_signal.requested = True
        if agreement() and stopped_at is None:
            stopped_at = step
    agreement.close()
    dist.destroy_process_group()
    with open(results, "a") as handle:
        handle.write(f"{rank} {stopped_at}\n")


@pytest.mark.parametrize("signalled_rank", [0, 1])
def test_every_rank_learns_of_a_stop_at_the_same_step(tmp_path, signalled_rank):
    """The stop flag is agreed without a host sync per step: one step after the first rank got the signal."""
    results = tmp_path / "results.txt"
    torch.multiprocessing.spawn(
        _agree_on_stopping, args=(str(tmp_path / "init"), signalled_rank, 5, str(results)), nprocs=2
    )
    assert sorted(results.read_text().split("\n")[:2]) == ["0 6", "1 6"]


def worker_pids(parent: int) -> dict[int, int]:
    """rank -> PID of the processes torchrun started (its children), from /proc."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    ranks = {}
    for pid in map(int, children):
        environment = dict(
            item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in item
        )
        ranks[int(environment["RANK"])] = pid
    return ranks


@pytest.mark.slow
def test_usr2_to_one_rank_stops_both_ranks_at_the_step_of_the_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    arguments = [
        *ARGS,
        "trainer.iterations=100000",
        "trainer.log_rate=2",
        "trainer.checkpoint_rate=0",
        f"hydra.run.dir={run_dir}",
    ]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=29535",
        "--monitor-interval=30",
        str(PROJECT_ROOT / "main.py"),
        *arguments,
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=user_environment()
    )
    try:
        deadline = time.monotonic() + 300
        while not ((run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.jsonl").read_text().strip()):
            assert process.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.1)
        os.kill(worker_pids(process.pid)[1], signal.SIGUSR2)  # the signal reaches rank 1 alone
        output, _ = process.communicate(timeout=60)  # both ranks stop within a step: training on is the failure
    finally:
        process.kill()
    steps = [int(step) for step in re.findall(r"stopped at step (\d+) by SIGUSR2", output)]
    assert len(steps) == 2 and steps[0] == steps[1], output
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] == steps[0]
