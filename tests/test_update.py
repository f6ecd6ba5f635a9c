"""The one update step (ddpm.training.update.UpdateStep) of the loop, task=benchmark and compare_diffusers.py: a non-finite
step never reaches the weights, and the EMA follows one policy on a skipped step whatever the optimizer kind."""

import pytest
import torch

from ddpm.diffusion.gaussian import GaussianDiffusion
from ddpm.diffusion.schedules import linear_betas
from ddpm.model.ema import EMA
from ddpm.model.unet import UNet
from ddpm.runtime.fast_paths import FastPaths
from ddpm.training.update import UpdateStep

CPU = torch.device("cpu")
OPTIMIZER_KINDS = pytest.mark.parametrize("fused", [False, True], ids=["for-loop-adam", "fused-adam"])


def tiny(decay: float = 0.9) -> GaussianDiffusion:
    torch.manual_seed(0)
    model = UNet(
        in_channels=1,
        image_size=8,
        base_channels=8,
        channel_mults=(1,),
        num_res_blocks=1,
        num_groups=4,
        attention_resolutions=(),
        dropout=0.0,
    )
    return GaussianDiffusion(model, linear_betas(50), 8, 1, ema=EMA(model, decay=decay, start=0))


def step_on(diffusion: GaussianDiffusion, update: UpdateStep, x: torch.Tensor):
    generator = torch.Generator().manual_seed(1)
    t, noise = diffusion.training_noise(x.shape[0], CPU, generator)
    return update(x, None, t, noise)


def clone(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in module.state_dict().items() if isinstance(tensor, torch.Tensor)}


@OPTIMIZER_KINDS
def test_a_skipped_step_leaves_weights_and_optimizer_alone_and_the_ema_counts_it(fused):
    diffusion = tiny()
    optimizer = torch.optim.Adam(diffusion.model.parameters(), lr=1e-2, fused=fused)
    update = UpdateStep(diffusion, optimizer, diffusion.update_ema, fast=FastPaths(), device=CPU, max_grad_norm=1.0)
    assert update.skips_on_device == fused
    good = step_on(diffusion, update, torch.rand(4, 1, 8, 8) * 2 - 1)  # one good step: Adam has state now
    assert bool(good.applied) and not bool(good.fault)

    weights, ema, adam = clone(diffusion.model), clone(diffusion.ema.module), optimizer.state_dict()
    updates = diffusion.ema.num_updates
    bad = step_on(diffusion, update, torch.full((4, 1, 8, 8), float("nan")))

    assert not bool(bad.applied) and bool(bad.fault)
    for name, tensor in diffusion.model.state_dict().items():
        assert torch.equal(tensor, weights[name]), name  # the weights never see the non-finite step
    after = optimizer.state_dict()["state"]
    for index, moments in adam["state"].items():
        for key, value in moments.items():
            assert torch.equal(after[index][key], value), (index, key)  # nor do Adam's moments or step count
    # The EMA counts the step and folds in the (unchanged) weights, as for any step: one policy for both kinds.
    assert diffusion.ema.num_updates == updates + 1
    for name, tensor in diffusion.ema.module.state_dict().items():
        if tensor.is_floating_point():
            torch.testing.assert_close(tensor, torch.lerp(ema[name], weights[name], 0.1), rtol=0, atol=1e-7, msg=name)


def test_the_loss_and_norm_are_returned_on_the_device_before_clipping():
    diffusion = tiny()
    optimizer = torch.optim.Adam(diffusion.model.parameters(), lr=1e-2)
    update = UpdateStep(diffusion, optimizer, diffusion.update_ema, fast=FastPaths(), device=CPU, max_grad_norm=1e-3)
    result = step_on(diffusion, update, torch.rand(4, 1, 8, 8) * 2 - 1)
    assert result.loss.requires_grad is False and result.grad_norm > 1e-3  # the norm before clipping
    gradients = [p.grad for p in diffusion.model.parameters() if p.grad is not None]
    clipped = torch.linalg.vector_norm(torch.stack([gradient.norm() for gradient in gradients]))
    assert float(clipped) == pytest.approx(1e-3, rel=1e-3)
