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


def _train_two_ranks(rank: int, init_file: str, norm: str, results: str) -> None:
    """One rank of test_data_parallel_ranks_keep_equal_buffers: four update steps on this rank's own images."""
    import torch.distributed as dist

    from ddpm.diffusion.gaussian import GaussianDiffusion
    from ddpm.diffusion.schedules import linear_betas
    from ddpm.model.ema import EMA
    from ddpm.model.unet import UNet
    from ddpm.runtime.distributed import data_parallel, share_running_statistics
    from ddpm.runtime.fast_paths import FastPaths
    from ddpm.training.update import UpdateStep

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)  # the same initial weights on both ranks, as the training task's seed gives
    model = UNet(
        in_channels=1,
        image_size=8,
        base_channels=8,
        channel_mults=(1,),
        attention_resolutions=(0,),
        num_res_blocks=1,
        num_groups=4,
        norm=norm,
    )
    diffusion = GaussianDiffusion(model, linear_betas(50), 8, 1, ema=EMA(model, decay=0.9))
    ranks = Ranks(rank, 2, rank)
    wrapped = data_parallel(diffusion, CPU, ranks)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    fast = FastPaths()  # fp32, eager
    step = UpdateStep(wrapped, optimizer, diffusion.update_ema, fast=fast, device=CPU, max_grad_norm=1.0)
    data = torch.Generator().manual_seed(100 + rank)  # each rank its own share of the batch
    for _ in range(4):
        x = torch.randn(4, 1, 8, 8, generator=data)
        step(x, None, torch.randint(0, 50, (4,), generator=data), torch.randn(x.shape, generator=data))
    share_running_statistics(diffusion, ranks)
    tensors = [*diffusion.named_parameters(), *diffusion.named_buffers()]  # the EMA's and the schedule's too
    state = {name: value.detach().clone() for name, value in tensors}
    gathered = [None, None] if rank == 0 else None
    dist.gather_object(state, gathered, dst=0)
    dist.destroy_process_group()
    if rank == 0:
        torch.save({"broadcast_buffers": wrapped.broadcast_buffers, "states": gathered}, results)


CPU = torch.device("cpu")


@pytest.mark.parametrize("norm", ["gn", "bn"])
def test_data_parallel_ranks_keep_equal_buffers(tmp_path, norm):
    """DDP broadcasts buffers before every forward pass only where training changes them (BatchNorm's running
    statistics); the ranks end with equal weights and buffers, the EMA's and the schedule's included."""
    results = tmp_path / "results.pt"
    torch.multiprocessing.spawn(_train_two_ranks, args=(str(tmp_path / "init"), norm, str(results)), nprocs=2)
    saved = torch.load(results)
    assert saved["broadcast_buffers"] is (norm == "bn")
    first, second = saved["states"]
    assert first.keys() == second.keys() and any("ema" in name for name in first)
    if norm == "bn":
        assert any("running_mean" in name for name in first)
    for name in first:
        torch.testing.assert_close(second[name], first[name], rtol=0, atol=0, msg=name)
