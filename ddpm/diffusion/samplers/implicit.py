"""DDIM: deterministic (eta = 0) or stochastic steps over a subset of the timesteps."""

import math

import torch

from ddpm.config.type_checks import config_types
from ddpm.diffusion.objectives import Denoiser
from ddpm.diffusion.samplers.common import (
    Callback,
    Generators,
    alphas_cumprod_list,
    check_eta,
    clip_x0,
    gaussian_like,
    spaced_timesteps,
)


@config_types("sampler")
@torch.no_grad()
def ddim(
    denoise: Denoiser,
    x: torch.Tensor,
    betas: torch.Tensor,
    *,
    steps: int = 50,
    eta: float = 0.0,
    spacing: str = "uniform",
    clip_denoised: bool = True,
    generator: Generators = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, Eq. 12) over `steps` timesteps; sigma = eta * sqrt(beta~) between them.

    With clip_denoised the predicted x0 is clipped to [-1, 1] and the noise re-derived from it. The last
    step (from t = 0) returns the predicted x0 and draws no noise; steps == T with eta == 1 is ancestral
    sampling with the posterior variance.
    """
    check_eta(eta)
    timesteps = spaced_timesteps(len(betas), steps, spacing)
    alphas_cumprod = alphas_cumprod_list(betas)
    for i, t in enumerate(timesteps):
        a_t = alphas_cumprod[t]
        a_next = alphas_cumprod[timesteps[i + 1]] if i + 1 < len(timesteps) else 1.0
        sigma = eta * math.sqrt((1 - a_next) / (1 - a_t) * (1 - a_t / a_next))
        eps, x0, _ = denoise(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long))
        if clip_denoised:
            eps, x0 = clip_x0(x, x0, a_t)
        # max(): 1 - a_next - sigma^2 is 0 up to rounding at eta = 1 (and below 0 for eta > 1).
        x = math.sqrt(a_next) * x0 + math.sqrt(max(1 - a_next - sigma**2, 0.0)) * eps
        if eta > 0 and i + 1 < len(timesteps):
            x = x + sigma * gaussian_like(x, generator)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "steps": len(timesteps)})
    return x
