"""A checkpoint continues on another memory layout or another device type: Adam's moments follow their
parameters' layout (torch's load_state_dict keeps the saved one, and the fused kernel silently computes a wrong
update from moments whose strides differ), and a noise stream drawn on another device type is re-seeded from
(seed, step) with a warning instead of failing (the two generators' states cannot be converted)."""

import copy
import logging

import torch
from test_training import run_loop, tiny_diffusion

from ddpm.runtime.distributed import Ranks
from ddpm.runtime.fast_paths import FastPaths, prepare_diffusion
from ddpm.training.noise_stream import GlobalBatchNoise, reseeded
from ddpm.training.optimizer import match_parameter_layouts


def one_fused_step(parameter: torch.Tensor, state: dict, gradient: torch.Tensor) -> torch.Tensor:
    """`parameter` after one fused Adam step from the loaded `state` (lr 0.1, large enough to see the moments)."""
    parameter = torch.nn.Parameter(parameter.clone())
    optimizer = torch.optim.Adam([parameter], lr=0.1, fused=True)
    optimizer.load_state_dict(copy.deepcopy(state))  # loading shares the moments' tensors, which a step changes
    match_parameter_layouts(optimizer)
    parameter.grad = torch.empty_like(parameter).copy_(gradient)  # autograd gives gradients the parameter's layout
    optimizer.step()
    return parameter.detach()


def test_moments_saved_in_nchw_take_the_layout_of_channels_last_parameters():
    torch.manual_seed(0)
    weight = torch.randn(8, 4, 3, 3)
    source = torch.nn.Parameter(weight.clone())
    optimizer = torch.optim.Adam([source], lr=0.1)
    for _ in range(3):  # moments that differ from element to element
        source.grad = torch.randn_like(source)
        optimizer.step()
    state = optimizer.state_dict()
    gradient = torch.randn_like(weight)
    nchw = one_fused_step(source.detach(), state, gradient)
    channels_last = one_fused_step(source.detach().contiguous(memory_format=torch.channels_last), state, gradient)
    torch.testing.assert_close(channels_last, nchw, rtol=1e-6, atol=1e-7)

    loaded = torch.optim.Adam([torch.nn.Parameter(weight.contiguous(memory_format=torch.channels_last))], fused=True)
    loaded.load_state_dict(copy.deepcopy(state))
    match_parameter_layouts(loaded)
    [(parameter, moments)] = loaded.state.items()
    assert moments["exp_avg"].stride() == moments["exp_avg_sq"].stride() == parameter.stride()
    assert moments["step"].shape == ()  # the step count is not a parameter-shaped tensor: left as it is


def test_a_run_resumed_with_channels_last_toggled_steps_as_the_for_loop_optimizer_does(tmp_path):
    """A run in NCHW, resumed from step 4 for one step in channels_last: fused Adam moves every weight as the
    for-loop Adam (which indexes by element, whatever the strides) from the same checkpoint, to the rounding of
    their different order of operations (moments in the wrong layout moved weights by up to 0.17 at lr 0.1). One
    step, since Adam turns rounding differences of near-zero gradients into full-size steps over several. (Until
    resume took the configured kernel, both runs here stepped with the checkpoint's fused one.)"""
    run_loop(tmp_path / "nchw", iterations=6, fused=True)
    checkpoint = tmp_path / "nchw" / "checkpoints" / "step_0000004.pt"
    weights = {}
    for fused in (True, False):
        fast = FastPaths(channels_last=True)
        diffusion = tiny_diffusion()
        prepare_diffusion(diffusion, fast)
        resumed, _, summary = run_loop(
            tmp_path / f"fused-{fused}",
            iterations=5,
            fused=fused,
            fast=fast,
            diffusion=diffusion,
            resume_from=checkpoint,
        )
        assert summary["resumed_from_step"] == 4
        weights[fused] = resumed.model.state_dict()
    for name, tensor in weights[False].items():
        torch.testing.assert_close(weights[True][name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_a_noise_stream_of_another_device_type_is_reseeded_from_seed_and_step(caplog):
    """A CUDA generator's state (its seed and offset, 16 bytes) on a CPU run: re-seeded, with a warning."""
    noise = GlobalBatchNoise(
        tiny_diffusion(),
        seed=7,
        local_batch=2,
        ranks=Ranks(),
        device=torch.device("cpu"),
    )
    with caplog.at_level(logging.WARNING, logger="ddpm.training.noise_stream"):
        noise.set_state(torch.zeros(16, dtype=torch.uint8), step=40)
    assert "re-seeded from (trainer.seed=7, step 40)" in caplog.text
    assert torch.equal(noise.generator.get_state(), torch.Generator().manual_seed(reseeded(7, 40)).get_state())
    assert reseeded(7, 40) != reseeded(7, 41) != reseeded(8, 40)

    same_type = torch.Generator().manual_seed(3).get_state()
    noise.set_state(same_type, step=40)  # a state of this device type continues exactly
    assert torch.equal(noise.generator.get_state(), same_type)
