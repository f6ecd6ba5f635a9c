"""Samplers: plain functions that turn noise x_T into images with a noise predictor.

Every sampler has the same signature,

    sampler(predict_noise, x, betas, *, generator=None, callback=None, **settings) -> x_0

where `predict_noise(x_t, t)` returns the predicted noise for integer timesteps `t` (shape [B]),
`x` is the starting noise x_T, and `betas` the noise schedule (float, length T). Randomness comes
only from `generator`, so a seeded generator gives the same images. `callback`, when given, is called
after every step with a dict {"i": step index, "t": timestep, "x": current x_t}.
"""

from collections.abc import Callable
from typing import Any

import torch

NoisePredictor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[dict[str, Any]], None]


@torch.no_grad()
def ddpm_ancestral(
    predict_noise: NoisePredictor,
    x: torch.Tensor,
    betas: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Ancestral sampling with sigma_t^2 = beta_t (Ho et al. 2020, Algorithm 2), one network call per step."""
    betas = betas.detach().double().cpu()
    alphas = 1 - betas
    alphas_cumprod = torch.cumprod(alphas, dim=0)
    # Per-step scalars as Python floats: no device indexing, and no host sync, inside the loop.
    noise_coef = (betas / torch.sqrt(1 - alphas_cumprod)).tolist()
    inv_sqrt_alpha = (1 / torch.sqrt(alphas)).tolist()
    sigma = torch.sqrt(betas).tolist()
    num_timesteps = len(betas)
    for i, t in enumerate(reversed(range(num_timesteps))):
        timesteps = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        eps = predict_noise(x, timesteps)
        x = (x - noise_coef[t] * eps) * inv_sqrt_alpha[t]
        if t > 0:
            x = x + sigma[t] * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        if callback is not None:
            callback({"i": i, "t": t, "x": x})
    return x
