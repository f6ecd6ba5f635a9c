"""Ancestral sampling, on every timestep or a respaced chain, with fixed or learned variances."""

import math

import torch

from ddpm.config.errors import ConfigError
from ddpm.config.type_checks import config_types
from ddpm.diffusion.objectives import Denoiser, Prediction, interpolated_log_variance
from ddpm.diffusion.samplers.common import (
    FIXED_FRACTIONS,
    Callback,
    Generators,
    alphas_cumprod_list,
    gaussian_like,
    spaced_timesteps,
)


def _step_fraction(variance: str | None, prediction: Prediction) -> float | torch.Tensor:
    """Where the variance of an ancestral step lies between beta~ (0) and beta (1): the sampler's own fixed
    choice, else the denoiser's (its diffusion's fixed choice, or what its network learned), else beta."""
    if variance is not None:
        return FIXED_FRACTIONS[variance]
    return 1.0 if prediction.variance_fraction is None else prediction.variance_fraction


@config_types("sampler")
@torch.no_grad()
def ddpm_ancestral(
    denoise: Denoiser,
    x: torch.Tensor,
    betas: torch.Tensor,
    *,
    steps: int | None = None,
    variance: str | None = None,
    generator: Generators = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Ancestral sampling (Ho et al. 2020, Algorithm 2) from the posterior q(x_s | x_t, x0) at the predicted x0.

    steps=None visits every timestep; fewer steps respace the chain (Nichol & Dhariwal 2021, Sec. 4): between
    consecutive visited timesteps t > s the step's beta is 1 - alpha_bar_t / alpha_bar_s. The step's variance
    is beta (variance="fixed_large", the seed's), the posterior variance beta~ ("fixed_small"), or, with
    variance=None, what the denoiser says: its diffusion's fixed choice or the variance its network learned,
    interpolated in log space between the step's beta~ and beta. The last step returns the predicted x0.
    """
    if variance is not None and variance not in FIXED_FRACTIONS:
        raise ConfigError(
            f"sampler.variance={variance!r} is not one of {[None, *FIXED_FRACTIONS]} "
            "(null: the diffusion's variance, learned or fixed)"
        )
    num_timesteps = len(betas)
    timesteps = list(range(num_timesteps - 1, -1, -1)) if steps is None else spaced_timesteps(num_timesteps, steps)
    alphas_cumprod = alphas_cumprod_list(betas)
    for i, t in enumerate(timesteps):
        a_t = alphas_cumprod[t]
        a_s = alphas_cumprod[timesteps[i + 1]] if i + 1 < len(timesteps) else 1.0
        prediction = denoise(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long))
        beta = min(max(1 - a_t / a_s, 0.0), 1.0)
        # The posterior mean (Ho et al. 2020, Eq. 7) for the step t -> s; at the last step (a_s = 1) it is x0.
        x0_coef = math.sqrt(a_s) * beta / (1 - a_t)
        x_coef = math.sqrt(1 - beta) * (1 - a_s) / (1 - a_t)
        mean = x0_coef * prediction.x0 + x_coef * x
        if i + 1 < len(timesteps):
            posterior_variance = beta * (1 - a_s) / (1 - a_t)
            fraction = _step_fraction(variance, prediction)
            if isinstance(fraction, float) and fraction in (0.0, 1.0):  # exactly beta~ (even where it is 0) or beta
                std = math.sqrt(beta if fraction == 1.0 else posterior_variance)
            else:  # log-space interpolation; the floor keeps log(0) out where beta~ underflows
                log_large, log_small = math.log(max(beta, 1e-300)), math.log(max(posterior_variance, 1e-300))
                fraction = torch.as_tensor(fraction, dtype=x.dtype, device=x.device)
                std = torch.exp(0.5 * interpolated_log_variance(fraction, log_small, log_large))
            x = mean + std * gaussian_like(x, generator)
        else:
            x = mean
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "steps": len(timesteps)})
    return x
