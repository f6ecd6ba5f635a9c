"""The terms of the variational bound of a Gaussian diffusion (Ho et al. 2020, Eq. 5), in bits/dim: the prior
L_T, the KL terms L_t and the discretized decoder L_0. The hybrid loss of learned variances trains on them and
ddpm.evaluation.likelihood sums them into the negative log-likelihood."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ddpm.diffusion import objectives
from ddpm.diffusion.objectives import extract

if TYPE_CHECKING:
    from ddpm.diffusion.gaussian import GaussianDiffusion


def bound_term(
    diffusion: GaussianDiffusion,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    output: torch.Tensor,
    fraction: torch.Tensor | float,
) -> torch.Tensor:
    """L_t of the variational bound per sample, in bits/dim, for the network's mean `output` at x_t:
    KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) for t > 0, and the discretized Gaussian decoder's
    -log p(x0 | x_1) for t = 0 (Ho et al. 2020, Eq. 5 and Sec. 3.3)."""
    alpha = extract(diffusion.sqrt_alphas_cumprod, t, x0.shape)
    sigma = extract(diffusion.sqrt_one_minus_alphas_cumprod, t, x0.shape)
    _, predicted_x0 = objectives.eps_and_x0(diffusion.prediction, output.float(), x_t, alpha, sigma)
    model_mean, _, _ = diffusion.q_posterior(predicted_x0, x_t, t)
    model_log_variance = objectives.interpolated_log_variance(
        fraction,
        extract(diffusion.posterior_log_variance_clipped, t, x0.shape),
        extract(diffusion.log_betas_clipped, t, x0.shape),
    )
    true_mean, _, true_log_variance = diffusion.q_posterior(x0, x_t, t)
    kl = objectives.bits_per_dim(objectives.normal_kl(true_mean, true_log_variance, model_mean, model_log_variance))
    decoder = -objectives.bits_per_dim(
        objectives.discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_variance)
    )
    return torch.where(t == 0, decoder, kl)


def bound_at(
    diffusion: GaussianDiffusion,
    x0: torch.Tensor,
    t: int,
    y: torch.Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    use_ema: bool = True,
) -> torch.Tensor:
    """L_t per image, in bits/dim, at timestep t with noise from `generator` (the network's own variance
    when learned, else the diffusion's fixed one)."""
    module = diffusion.ema.module if (use_ema and diffusion.ema is not None) else diffusion.model
    timesteps = torch.full((x0.shape[0],), t, device=x0.device, dtype=torch.long)
    noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    x_t = diffusion.q_sample(x0, timesteps, noise)
    output = module(x_t, timesteps, y).float()
    fraction = diffusion.network_fraction()
    if diffusion.learns_variance:
        output, variance_output = output.chunk(2, dim=1)
        fraction = objectives.variance_fraction(variance_output)
    return bound_term(diffusion, x0, x_t, timesteps, output, fraction)


def prior_bits(diffusion: GaussianDiffusion, x0: torch.Tensor) -> torch.Tensor:
    """L_T = KL(q(x_T | x0) || N(0, I)) per sample, in bits/dim: no parameters, near 0 for a good schedule."""
    last = torch.full((x0.shape[0],), diffusion.num_timesteps - 1, device=x0.device, dtype=torch.long)
    mean = extract(diffusion.sqrt_alphas_cumprod, last, x0.shape) * x0
    log_variance = torch.log1p(-extract(diffusion.alphas_cumprod, last, x0.shape).double()).float()
    return objectives.bits_per_dim(objectives.normal_kl(mean, log_variance, torch.zeros_like(mean), 0.0))
