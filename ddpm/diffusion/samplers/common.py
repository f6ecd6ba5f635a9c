"""What the samplers share: the types of their arguments, drawing noise, spacing timesteps, and the schedule's
alpha_bar as floats."""

import math
from collections.abc import Callable
from typing import Any

import torch

from ddpm.config.errors import ConfigError
from ddpm.diffusion import objectives
from ddpm.diffusion.samplers.image_noise import ImageNoise

Callback = Callable[[dict[str, Any]], None]
Generators = torch.Generator | ImageNoise | None  # one stream for the batch, or one per image

# The fixed variances as fractions of the way from log beta~_t to log beta_t (see ddpm.diffusion.objectives).
FIXED_FRACTIONS = {"fixed_large": 1.0, "fixed_small": 0.0}
SPACINGS = ("uniform", "quadratic")


def gaussian_like(x: torch.Tensor, generator: Generators) -> torch.Tensor:
    """N(0, I) noise of x's shape, device and dtype, from one generator or from a stream per image."""
    if isinstance(generator, ImageNoise):
        return generator.normal(x.shape, x.dtype)
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def spaced_timesteps(num_timesteps: int, steps: int, spacing: str = "uniform") -> list[int]:
    """`steps` distinct timesteps from T-1 down to 0, evenly spaced ("uniform") or denser near t = 0
    ("quadratic", as in Song et al. 2021, Sec. D.2, but reaching T-1 so that x_T matches pure noise).

    t_i = i + round((T - steps) * f(i / (steps - 1))) with f(u) = u or u^2: strictly increasing in i, so
    steps == T gives every timestep.
    """
    if spacing not in SPACINGS:
        raise ConfigError(f"sampler.spacing={spacing!r} is not one of {list(SPACINGS)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= num_timesteps:
        raise ConfigError(
            f"sampler.steps={steps!r} must be an integer in 1..{num_timesteps} (the schedule's num_timesteps)"
        )
    if steps == 1:
        return [num_timesteps - 1]
    power = 1 if spacing == "uniform" else 2
    extra = num_timesteps - steps
    ascending = [i + math.floor(extra * (i / (steps - 1)) ** power + 0.5) for i in range(steps)]
    return ascending[::-1]


def alphas_cumprod_list(betas: torch.Tensor) -> list[float]:
    """alpha_bar_t in float64, kept in [MIN_ALPHA_BAR, MAX_ALPHA_BAR], as Python floats."""
    return objectives.alphas_cumprod(betas).tolist()


def clip_x0(x: torch.Tensor, x0: torch.Tensor, alpha_bar: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(eps, x0) with x0 clipped to [-1, 1] and the noise re-derived from it, so that x_t = sqrt(alpha_bar) x0 +
    sqrt(1 - alpha_bar) eps still holds: the step then moves towards an image inside the data's range."""
    x0 = x0.clamp(-1, 1)
    return (x - math.sqrt(alpha_bar) * x0) * (1 / math.sqrt(1 - alpha_bar)), x0


def check_eta(eta: float) -> None:
    if not (math.isfinite(eta) and eta >= 0):
        raise ConfigError(f"sampler.eta={eta!r} must be a number >= 0 (0 = deterministic DDIM, 1 = DDPM-like)")
