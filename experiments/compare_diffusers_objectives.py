"""This project's samplers against diffusers' schedulers on the same function, for the objectives of
`ddpm.diffusion.objectives`: v-prediction DDIM and ancestral steps with learned-range variances (respaced).

    pip install -e ".[bench]"          # diffusers
    python experiments/compare_diffusers_objectives.py [--steps 50] [--respaced-steps 25]

The network is a fixed random function of (x, t), the same for both sides; the schedule is DDPM's linear one
(1e-4 .. 0.02 over T = 1000). It prints, per comparison, the largest absolute difference of the final images
and of every intermediate x, twice: as shipped (diffusers keeps its schedule in float32, this project computes
it in float64 and samples in float32), and with both sides in float64 (diffusers' schedule tensors replaced by
float64 ones), which compares the formulas alone. It exits 1 when a float64 difference exceeds --tolerance.

DDIM: diffusers' DDIMScheduler visits t = k * (T // steps) ("leading" spacing, the last step to alpha_bar = 1),
ours T-1 .. 0 evenly spaced; on the first (steps - 1) * (T // steps) + 1 timesteps of the schedule ours visits
exactly diffusers' timesteps, so the comparison runs there. Ancestral: DDPMScheduler with custom timesteps (ours,
`ddpm.diffusion.samplers.spaced_timesteps`) and variance_type="learned_range", fed the same per-step noise.
"""

from __future__ import annotations

import argparse
import sys

import torch

from ddpm.diffusion.objectives import denoiser
from ddpm.diffusion.samplers import ddim, ddpm_ancestral, spaced_timesteps


def random_function(channels: int, seed: int = 0):
    """out(x, t) = tanh(W x + b(t)): a fixed nonlinear map with `channels` output channels per input pixel,
    computed in x's dtype."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(channels, 3, generator=generator, dtype=torch.float64) * 0.5
    bias = torch.randn(channels, generator=generator, dtype=torch.float64) * 0.1

    def network(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        phase = (t.to(x.dtype) / 1000).reshape(-1, 1, 1, 1)
        w, b = weight.to(x.dtype), bias.to(x.dtype).reshape(1, -1, 1, 1)
        return torch.tanh(torch.einsum("oc,bchw->bohw", w, x) + b * (1 + phase))

    return network


def in_float64(scheduler) -> None:
    """diffusers' schedule tensors (float32) recomputed in float64, so that both sides compute the same thing."""
    scheduler.betas = scheduler.betas.double()
    scheduler.alphas_cumprod = torch.cumprod(1 - scheduler.betas, dim=0)
    scheduler.one = torch.tensor(1.0, dtype=torch.float64)
    if hasattr(scheduler, "final_alpha_cumprod"):
        scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)


def compare(
    name: str, dtype: torch.dtype, ours: list[torch.Tensor], theirs: list[torch.Tensor], tolerance: float
) -> bool:
    steps = max((a - b).abs().max().item() for a, b in zip(ours, theirs, strict=True))
    final = (ours[-1] - theirs[-1]).abs().max().item()
    ok = len(ours) == len(theirs) and (steps <= tolerance or dtype != torch.float64)
    verdict = "ok" if ok and dtype == torch.float64 else ("as shipped" if ok else "DIFFERENT")
    print(
        f"{name}, {str(dtype)[6:]}: {len(ours)} steps, max |diff| final {final:.3g}, any step {steps:.3g} -> {verdict}"
    )
    return ok


def v_prediction_ddim(steps: int, tolerance: float, dtype: torch.dtype) -> bool:
    from diffusers import DDIMScheduler

    num_train = 1000
    truncated = (steps - 1) * (num_train // steps) + 1
    scheduler = DDIMScheduler(
        num_train_timesteps=num_train,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        prediction_type="v_prediction",
        clip_sample=False,
        set_alpha_to_one=True,
    )
    scheduler.set_timesteps(steps)
    if dtype == torch.float64:
        in_float64(scheduler)
    betas = scheduler.betas[:truncated]
    network = random_function(3)
    x_T = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=dtype)

    ours_states = []
    ddim(
        denoiser(network, "v", betas),
        x_T,
        betas,
        steps=steps,
        eta=0.0,
        clip_denoised=False,
        callback=lambda state: ours_states.append(state["x"]),
    )
    expected = spaced_timesteps(truncated, steps)
    if scheduler.timesteps.tolist() != expected:
        print(f"timesteps differ: diffusers {scheduler.timesteps.tolist()[:5]}..., ours {expected[:5]}...")
        return False
    theirs, x = [], x_T.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(network(x, t.repeat(x.shape[0])), t, x, eta=0.0).prev_sample
        theirs.append(x)
    return compare(f"DDIM, v-prediction, {steps} steps", dtype, ours_states, theirs, tolerance)


def learned_range_ancestral(steps: int, tolerance: float, dtype: torch.dtype) -> bool:
    from diffusers import DDPMScheduler

    num_train = 1000
    scheduler = DDPMScheduler(
        num_train_timesteps=num_train,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        variance_type="learned_range",
        prediction_type="epsilon",
        clip_sample=False,
    )
    timesteps = spaced_timesteps(num_train, steps)
    scheduler.set_timesteps(timesteps=timesteps)
    if dtype == torch.float64:
        in_float64(scheduler)
    network = random_function(6)  # 3 mean channels, 3 variance channels
    x_T = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(2), dtype=dtype)

    ours_states = []
    ddpm_ancestral(
        denoiser(network, "eps", scheduler.betas, learned_variance=True),
        x_T,
        scheduler.betas,
        steps=steps,
        generator=torch.Generator().manual_seed(3),
        callback=lambda state: ours_states.append(state["x"]),
    )
    theirs, x, generator = [], x_T.clone(), torch.Generator().manual_seed(3)
    for t in scheduler.timesteps:
        x = scheduler.step(network(x, t.repeat(x.shape[0])), t, x, generator=generator).prev_sample
        theirs.append(x)
    return compare(f"ancestral, learned_range, {steps} respaced steps", dtype, ours_states, theirs, tolerance)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--respaced-steps", type=int, default=25, help="ancestral steps over the 1000 timesteps")
    parser.add_argument("--tolerance", type=float, default=1e-9, help="largest float64 difference allowed")
    args = parser.parse_args()
    results = [
        check(args.tolerance, dtype)
        for dtype in (torch.float32, torch.float64)
        for check in (
            lambda tol, dt: v_prediction_ddim(args.steps, tol, dt),
            lambda tol, dt: learned_range_ancestral(args.respaced_steps, tol, dt),
            lambda tol, dt: learned_range_ancestral(1000, tol, dt),
        )
    ]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
