"""Small exact cases for behaviour the rest of the fast suite let change unnoticed: a boundary of a schedule's
checks moved by one, the value a clipped buffer takes at t = 0, a branch of the EMA for integer buffers, and
similar single-line slips (a bound check loosened, a term dropped, an argument swapped). Each test pins one such
behaviour with hand-computed values chosen so that a neighbouring mistake gives another answer."""

import json
import math
import os

import numpy as np
import pytest
import torch
from torch import nn

from ddpm.config.errors import CheckpointError, ConfigError
from ddpm.diffusion.gaussian import GaussianDiffusion
from ddpm.diffusion.schedules import cosine_betas
from ddpm.evaluation.metrics import frechet_distance
from ddpm.io.checkpoint import periodic_checkpoints, periodic_name, save_checkpoint
from ddpm.model.blocks import ResidualBlock
from ddpm.model.ema import EMA
from ddpm.runtime import run_directory
from ddpm.training.loop import learning_rate
from ddpm.training.resume import check_resumable, find_resume_checkpoint

# ------------------------------------------------------------------------------------------ schedules


def test_the_cosine_schedule_refuses_an_offset_of_zero():
    with pytest.raises(ConfigError, match=r"schedule\.s=0\.0 must be > 0"):
        cosine_betas(10, s=0.0)


def test_the_cosine_schedule_refuses_a_max_beta_of_one():
    with pytest.raises(ConfigError, match=r"schedule\.max_beta=1\.0 must be in \(0, 1\)"):
        cosine_betas(10, max_beta=1.0)


# --------------------------------------------------------------------------------- diffusion buffers


def test_both_clipped_log_variances_take_beta_tilde_of_step_one_at_step_zero():
    """betas 0.1, 0.2, 0.3, 0.4: alpha_bar = 0.9, 0.72, 0.504, 0.3024 and beta~_t = beta_t (1 - alpha_bar_{t-1}) /
    (1 - alpha_bar_t). At t = 0, where beta~_0 = 0, both logs hold log beta~_1, not beta~_2 nor beta_0."""
    betas = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    diffusion = GaussianDiffusion(nn.Identity(), betas, image_size=2, channels=1)
    tilde_1, tilde_2, tilde_3 = 0.2 * 0.1 / 0.28, 0.3 * 0.28 / 0.496, 0.4 * 0.496 / 0.6976
    expected_small = torch.tensor([tilde_1, tilde_1, tilde_2, tilde_3]).log()
    expected_large = torch.tensor([tilde_1, 0.2, 0.3, 0.4]).log()
    torch.testing.assert_close(diffusion.posterior_log_variance_clipped, expected_small)
    torch.testing.assert_close(diffusion.log_betas_clipped, expected_large)


# ------------------------------------------------------------------------------------------------ EMA


def test_the_ema_copies_integer_buffers_while_it_averages_the_floating_ones():
    model = nn.BatchNorm1d(2)
    ema = EMA(model, decay=0.5, start=0, update_rate=1)
    model.train()
    for _ in range(3):
        model(torch.tensor([[1.0, 2.0], [3.0, 6.0]]))
    ema.update(model)  # update 1, past start: averaged
    assert ema.module.num_batches_tracked.item() == 3  # copied, not left at 0
    torch.testing.assert_close(ema.module.running_mean, torch.lerp(torch.zeros(2), model.running_mean, 0.5))
    assert not math.isclose(model.running_mean[0].item(), 0.0)


# ---------------------------------------------------------------------------------------------- resume

RESUMED_CONFIG = {
    "model": {"base_channels": 16},
    "schedule": {"num_timesteps": 1000, "low": 1e-4},
    "diffusion": {"prediction": "eps"},
    "dataset": {"root": "/data"},
    "trainer": {"iterations": 10, "use_labels": True, "loss_type": "l2", "use_ema": True},
}


@pytest.mark.parametrize(
    "section, key, value",
    [
        ("schedule", "num_timesteps", 500),
        ("diffusion", "prediction", "v"),
        ("trainer", "loss_type", "l1"),
        ("trainer", "use_ema", False),
    ],
)
def test_resuming_refuses_another_schedule_objective_loss_or_ema_setting(tmp_path, section, key, value):
    state = {"model": {}, "step": 3, "config": RESUMED_CONFIG, "optimizer": {}, "loop": {}, "data": {}, "rng": {}}
    check_resumable(tmp_path, state, RESUMED_CONFIG)
    changed = {**RESUMED_CONFIG, section: {**RESUMED_CONFIG[section], key: value}}
    with pytest.raises(ConfigError, match=rf"{section}\.{key}={value!r}, but trainer\.resume="):
        check_resumable(tmp_path, state, changed)


def test_auto_resume_continues_a_checkpoint_without_a_run_id_and_skips_another_runs(tmp_path):
    """Checkpoints of older versions carry no run id and belong to the run in their directory."""
    save_checkpoint(tmp_path / "step_0000004.pt", {"model": {}, "step": 4, "config": {}})
    save_checkpoint(tmp_path / "last.pt", {"model": {}, "step": 6, "config": {}, "run_id": "someone-else"})
    path, state = find_resume_checkpoint("auto", tmp_path, run="this-run")
    assert path.name == "step_0000004.pt" and state["step"] == 4
    (tmp_path / "step_0000004.pt").unlink()
    with pytest.raises(CheckpointError, match="last.pt of another run"):
        find_resume_checkpoint("auto", tmp_path, run="this-run")


def test_periodic_checkpoints_are_ordered_by_their_step_not_by_when_the_files_were_written(tmp_path):
    for step, written in ((20, 1_000), (3, 3_000), (100, 2_000)):
        save_checkpoint(tmp_path / periodic_name(step), {"model": {}, "step": step, "config": {}})
        os.utime(tmp_path / periodic_name(step), (written, written))  # as a copy of the directory may leave them
    assert [p.name for p in periodic_checkpoints(tmp_path)] == [periodic_name(100), periodic_name(20), periodic_name(3)]


# ------------------------------------------------------------------------------------- learning rate


def test_a_decay_over_no_steps_after_the_warmup_keeps_the_base_learning_rate():
    assert learning_rate(3, 2.0, 3, "cosine", 3) == 2.0
    assert learning_rate(7, 2.0, 3, "linear", 3) == 2.0
    assert learning_rate(1, 2.0, 3, "linear", 3) == 2.0 * 2 / 3


# ----------------------------------------------------------------------------------------------- FID


def test_fid_takes_a_slightly_negative_eigenvalue_of_a_covariance_as_zero():
    """sigma1 = diag(4, -1e-6), sigma2 = I, equal means: 4 - 1e-6 + 2 - 2 (sqrt(4) + sqrt(0)) = 2 - 1e-6; with
    the rounding's -1e-6 taken as 1e-6 instead, the root would hold 1e-3 and the distance be 2e-3 smaller."""
    distance = frechet_distance(np.zeros(2), np.diag([4.0, -1e-6]), np.zeros(2), np.eye(2))
    assert distance == pytest.approx(2 - 1e-6, abs=1e-9)


# ------------------------------------------------------------------------------------- run directory


def test_claiming_a_run_directory_replaces_a_longer_stale_holder_record(tmp_path):
    (tmp_path / run_directory.LOCK_FILE).write_text("x" * 1000)
    run_directory.claim(tmp_path)
    try:
        holder = json.loads((tmp_path / run_directory.LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid()
    finally:
        run_directory.release(tmp_path)


# ---------------------------------------------------------------------------------------------- UNet


def test_a_class_conditional_residual_block_adds_the_time_and_the_class_bias():
    torch.manual_seed(0)
    block = ResidualBlock(
        2,
        3,
        time_emb_dim=4,
        num_classes=3,
        dropout=0.0,
        norm="gn",
        num_groups=1,
        activation="silu",
        attention=False,
    ).eval()
    x, time_emb, y = torch.randn(2, 2, 4, 4), torch.randn(2, 4), torch.tensor([2, 0])
    with torch.no_grad():
        h = block.conv_1(block.activation(block.norm_1(x)))
        bias = block.time_bias(block.activation(time_emb)) + block.class_bias(y)
        h = block.conv_2(block.activation(block.norm_2(h + bias[:, :, None, None])))
        torch.testing.assert_close(block(x, time_emb, y), h + block.skip(x))
