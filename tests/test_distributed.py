"""Data-parallel training without SLURM: `torchrun --nproc_per_node=2 main.py ...` on CPU (gloo) trains like
one process with the same global batch, and its ranks agree."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import PROJECT_ROOT, TINY_QUICKSTART, run_main, user_environment
from ddpm.checkpoint import load_checkpoint
from ddpm.distributed import Ranks, local_batch_size
from ddpm.errors import ConfigError

ARGS = [*TINY_QUICKSTART, "schedule.num_timesteps=50", "trainer.iterations=6", "trainer.batch_size=16",
        "trainer.log_rate=3", "trainer.checkpoint_rate=3", "trainer.test_batches=1", "trainer.sample_at_end=false"]  # fmt: skip


def test_the_global_batch_is_shared_evenly():
    assert local_batch_size(128, Ranks(0, 4, 0)) == 32
    with pytest.raises(ConfigError, match="trainer.batch_size=10 is the global batch"):
        local_batch_size(10, Ranks(0, 4, 0))


@pytest.mark.slow
def test_torchrun_with_two_ranks_matches_one_process(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
               str(PROJECT_ROOT / "main.py"), *ARGS, f"hydra.run.dir={tmp_path / 'two'}"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=user_environment(), timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    run_main(*ARGS, f"hydra.run.dir={tmp_path / 'one'}")

    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2 and len(set(summary["rank_weight_digests"])) == 1
    two = load_checkpoint(tmp_path / "two" / "checkpoints" / "last.pt")
    one = load_checkpoint(tmp_path / "one" / "checkpoints" / "last.pt")
    for name in one["model"]:  # the same batches and noise; only the order of the gradient sums differs
        torch.testing.assert_close(two["model"][name], one["model"][name], rtol=1e-3, atol=1e-3, msg=name)
    logged = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [row["train_loss"] for row in logged] == pytest.approx([row["train_loss"] for row in reference], rel=1e-4)
