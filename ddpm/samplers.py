"""Samplers: plain functions that turn noise x_T into images with a noise predictor.

Every sampler has the same signature,

    sampler(predict_noise, x, betas, *, generator=None, callback=None, **settings) -> x_0

where `predict_noise(x_t, t)` returns the predicted noise for integer timesteps `t` (shape [B], values in
0..T-1), `x` is the starting noise x_T, and `betas` the noise schedule (float, length T). Randomness comes
only from `generator`, so a seeded generator gives the same images; a list of generators, one per image, makes
each image's noise independent of the other images in the batch. `callback`, when given, is called after
every network evaluation with a dict {"i": step index, "t": timestep, "x": the new x, "steps": the number of
network evaluations the sampler makes in all}. Schedule
quantities are computed in float64 and applied as Python floats, so tiny or huge betas stay finite.
Clamping the final image to [-1, 1] is the caller's job.
"""

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ddpm.checks import config_types
from ddpm.errors import ConfigError

NoisePredictor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[dict[str, Any]], None]
Generators = torch.Generator | Sequence[torch.Generator] | None  # one for the batch, or one per image

VARIANCES = ("beta", "posterior")
SPACINGS = ("uniform", "quadratic")
# alpha_bar below MIN is pure noise for any float32 image (signal std 1e-10): flooring it keeps
# 1 / sqrt(alpha_bar) representable when huge betas underflow alpha_bar to 0. Above MAX the noise std is
# under 1e-6, below float32 resolution: capping it keeps 1 / sqrt(1 - alpha_bar) finite when a beta is 0.
MIN_ALPHA_BAR, MAX_ALPHA_BAR = 1e-20, 1 - 1e-12


def gaussian_like(x: torch.Tensor, generator: Generators) -> torch.Tensor:
    """N(0, I) noise of x's shape, device and dtype, from one generator or from one generator per image."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    if len(generator) != x.shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {x.shape[0]} images")
    return torch.stack([torch.randn(x.shape[1:], generator=g, device=x.device, dtype=x.dtype) for g in generator])


@config_types("sampler")
@torch.no_grad()
def ddpm_ancestral(
    predict_noise: NoisePredictor,
    x: torch.Tensor,
    betas: torch.Tensor,
    *,
    variance: str = "beta",
    generator: Generators = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Ancestral sampling (Ho et al. 2020, Algorithm 2), one network call per timestep, with
    sigma_t^2 = beta_t (variance="beta") or the posterior variance beta~_t (variance="posterior")."""
    if variance not in VARIANCES:
        raise ConfigError(f"sampler.variance={variance!r} is not one of {list(VARIANCES)}")
    betas = betas.detach().double().cpu()
    alphas = 1 - betas
    alphas_cumprod = torch.cumprod(alphas, dim=0)
    # Per-step scalars as Python floats: no device indexing, and no host sync, inside the loop.
    noise_coef = (betas / torch.sqrt(1 - alphas_cumprod)).tolist()
    inv_sqrt_alpha = (1 / torch.sqrt(alphas)).tolist()
    if variance == "beta":
        sigma = torch.sqrt(betas).tolist()
    else:
        alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        sigma = torch.sqrt(betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)).tolist()
    num_timesteps = len(betas)
    for i, t in enumerate(reversed(range(num_timesteps))):
        timesteps = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        eps = predict_noise(x, timesteps)
        x = (x - noise_coef[t] * eps) * inv_sqrt_alpha[t]
        if t > 0:
            x = x + sigma[t] * gaussian_like(x, generator)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "steps": num_timesteps})
    return x


def spaced_timesteps(num_timesteps: int, steps: int, spacing: str = "uniform") -> list[int]:
    """`steps` distinct timesteps from T-1 down to 0, evenly spaced ("uniform") or denser near t = 0
    ("quadratic", as in Song et al. 2021, Sec. D.2, but reaching T-1 so that x_T matches pure noise).

    t_i = i + round((T - steps) * f(i / (steps - 1))) with f(u) = u or u^2: strictly increasing in i, so
    steps == T gives every timestep.
    """
    if spacing not in SPACINGS:
        raise ConfigError(f"sampler.spacing={spacing!r} is not one of {list(SPACINGS)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= num_timesteps:
        raise ConfigError(f"sampler.steps={steps!r} must be an integer in 1..{num_timesteps} "
                          "(the schedule's num_timesteps)")  # fmt: skip
    if steps == 1:
        return [num_timesteps - 1]
    power = 1 if spacing == "uniform" else 2
    extra = num_timesteps - steps
    ascending = [i + math.floor(extra * (i / (steps - 1)) ** power + 0.5) for i in range(steps)]
    return ascending[::-1]


def _alphas_cumprod(betas: torch.Tensor) -> list[float]:
    """alpha_bar_t in float64, kept in [MIN_ALPHA_BAR, MAX_ALPHA_BAR], as Python floats."""
    alphas_cumprod = torch.cumprod(1 - betas.detach().double().cpu(), dim=0)
    return alphas_cumprod.clamp(MIN_ALPHA_BAR, MAX_ALPHA_BAR).tolist()


def _check_eta(eta: float) -> None:
    if not (math.isfinite(eta) and eta >= 0):
        raise ConfigError(f"sampler.eta={eta!r} must be a number >= 0 (0 = deterministic DDIM, 1 = DDPM-like)")


@config_types("sampler")
@torch.no_grad()
def ddim(
    predict_noise: NoisePredictor,
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
    _check_eta(eta)
    timesteps = spaced_timesteps(len(betas), steps, spacing)
    alphas_cumprod = _alphas_cumprod(betas)
    for i, t in enumerate(timesteps):
        a_t = alphas_cumprod[t]
        a_next = alphas_cumprod[timesteps[i + 1]] if i + 1 < len(timesteps) else 1.0
        sigma = eta * math.sqrt((1 - a_next) / (1 - a_t) * (1 - a_t / a_next))
        eps = predict_noise(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long))
        x0 = (x - math.sqrt(1 - a_t) * eps) * (1 / math.sqrt(a_t))
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
            eps = (x - math.sqrt(a_t) * x0) * (1 / math.sqrt(1 - a_t))
        # max(): 1 - a_next - sigma^2 is 0 up to rounding at eta = 1 (and below 0 for eta > 1).
        x = math.sqrt(a_next) * x0 + math.sqrt(max(1 - a_next - sigma**2, 0.0)) * eps
        if eta > 0 and i + 1 < len(timesteps):
            x = x + sigma * gaussian_like(x, generator)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "steps": len(timesteps)})
    return x


@config_types("sampler")
@torch.no_grad()
def dpm_solver(
    predict_noise: NoisePredictor,
    x: torch.Tensor,
    betas: torch.Tensor,
    *,
    steps: int = 20,
    clip_denoised: bool = True,
    generator: Generators = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) in data-prediction form on the discrete schedule.

    `steps` network evaluations at uniformly spaced timesteps T-1 ... 0: a first-order step, second-order
    multistep updates to t = 0, then the final denoising step returns the x0 predicted at t = 0.
    Deterministic (`generator` is unused); clip_denoised clips each predicted x0 to [-1, 1].
    """
    timesteps = spaced_timesteps(len(betas), steps, "uniform")
    alphas_cumprod = _alphas_cumprod(betas)
    alpha = [math.sqrt(a) for a in alphas_cumprod]
    sigma = [math.sqrt(1 - a) for a in alphas_cumprod]
    lam = [0.5 * (math.log(a) - math.log1p(-a)) for a in alphas_cumprod]  # log(alpha_t / sigma_t)
    previous_x0, previous_h = None, 0.0
    for i, t in enumerate(timesteps):
        eps = predict_noise(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long))
        x0 = (x - sigma[t] * eps) * (1 / alpha[t])
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        if i + 1 == len(timesteps):  # the final denoising step
            x = x0
        else:
            s = timesteps[i + 1]
            h = lam[s] - lam[t]
            denoised = x0
            if previous_x0 is not None and previous_h > 0:  # 2M: r = previous_h / h
                denoised = x0 + (h / (2 * previous_h)) * (x0 - previous_x0)
            x = (sigma[s] / sigma[t]) * x - (alpha[s] * math.expm1(-h)) * denoised
            previous_x0, previous_h = x0, h
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "steps": len(timesteps)})
    return x
