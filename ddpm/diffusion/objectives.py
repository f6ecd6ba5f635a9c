"""What the network predicts and how its error is weighted: the one place where a prediction target is turned
into (eps, x0), and the Gaussian terms of the variational bound (Ho et al. 2020, Eq. 5).

Notation: x_t = alpha_t x0 + sigma_t eps with alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t),
so alpha_t^2 + sigma_t^2 = 1, and snr_t = alpha_t^2 / sigma_t^2. The targets:

    eps  the noise (Ho et al. 2020)
    x0   the clean image
    v    alpha_t eps - sigma_t x0 (Salimans & Ho 2022): x0 = alpha_t x_t - sigma_t v, eps = sigma_t x_t + alpha_t v

alpha and sigma may be Python floats (the samplers' per-step scalars) or tensors that broadcast against x_t.
"""

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from ddpm.config.errors import ConfigError

PREDICTIONS = ("eps", "x0", "v")
WEIGHTINGS = ("uniform", "min_snr")
VARIANCES = ("fixed_large", "fixed_small", "learned_range")
# alpha_bar below MIN is pure noise for any float32 image (signal std 1e-10): flooring it keeps
# 1 / sqrt(alpha_bar) representable when huge betas underflow alpha_bar to 0. Above MAX the noise std is
# under 1e-6, below float32 resolution: capping it keeps 1 / sqrt(1 - alpha_bar) finite when a beta is 0.
MIN_ALPHA_BAR, MAX_ALPHA_BAR = 1e-20, 1 - 1e-12


class Prediction(NamedTuple):
    """A denoiser's answer at (x_t, t): the noise and the clean image it implies, and, for a network that
    learns its variances, the fraction in [0, 1] between log beta~_t (0) and log beta_t (1) (Nichol & Dhariwal
    2021, Eq. 15), which each sampler turns into the variance of its own step."""

    eps: torch.Tensor
    x0: torch.Tensor
    variance_fraction: torch.Tensor | float | None = None


# What every sampler calls: (x_t, integer timesteps [B]) -> Prediction.
Denoiser = Callable[[torch.Tensor, torch.Tensor], Prediction]


def extract(a: torch.Tensor, t: torch.Tensor, x_shape: torch.Size) -> torch.Tensor:
    """a[t] for a batch of timesteps, shaped to broadcast against a batch of images."""
    return a.gather(0, t).reshape(t.shape[0], *([1] * (len(x_shape) - 1)))


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """alpha_bar_t in float64 on the CPU, kept in [MIN_ALPHA_BAR, MAX_ALPHA_BAR]."""
    return torch.cumprod(1 - betas.detach().double().cpu(), dim=0).clamp(MIN_ALPHA_BAR, MAX_ALPHA_BAR)


def denoiser(
    network: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    prediction: str,
    betas: torch.Tensor,
    *,
    learned_variance: bool = False,
    fixed_fraction: float | None = None,
) -> Denoiser:
    """The Denoiser of a network (x_t, t) -> output trained for target `prediction` on the schedule `betas`.

    With learned_variance the output's second half of channels is the variance (Nichol & Dhariwal 2021);
    otherwise `fixed_fraction` (1 = beta, 0 = beta~, None = the sampler's choice) is passed on.
    """
    ab = alphas_cumprod(betas)
    table = torch.stack([ab.sqrt(), (1 - ab).sqrt()])  # float64: cast once per device and dtype of the images
    tables: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def denoise(x_t: torch.Tensor, t: torch.Tensor) -> Prediction:
        key = (x_t.device, x_t.dtype)
        if key not in tables:
            tables[key] = table.to(dtype=x_t.dtype).to(x_t.device)
        scale = tables[key][:, t].reshape(2, -1, *([1] * (x_t.dim() - 1)))
        output = network(x_t, t)
        fraction: torch.Tensor | float | None = fixed_fraction
        if learned_variance:
            output, variance_output = output.chunk(2, dim=1)
            fraction = variance_fraction(variance_output)
        eps, x0 = eps_and_x0(prediction, output, x_t, scale[0], scale[1])
        return Prediction(eps, x0, fraction)

    return denoise


def check_choice(key: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of {list(choices)}")


def eps_and_x0(
    prediction: str, output: torch.Tensor, x_t: torch.Tensor, alpha, sigma
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (eps, x0) pair that the network's `output` for target `prediction` stands for at x_t."""
    if prediction == "eps":
        return output, (x_t - sigma * output) * (1 / alpha)
    if prediction == "x0":
        return (x_t - alpha * output) * (1 / sigma), output
    if prediction == "v":
        return sigma * x_t + alpha * output, alpha * x_t - sigma * output
    raise ValueError(f"unknown prediction target {prediction!r}")


def training_target(prediction: str, x0: torch.Tensor, eps: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """What the network should output for target `prediction` at x_t = alpha x0 + sigma eps."""
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        return alpha * eps - sigma * x0
    raise ValueError(f"unknown prediction target {prediction!r}")


def x0_error_per_target_error(prediction: str, snr: torch.Tensor) -> torch.Tensor:
    """|x0 error|^2 / |target error|^2 at signal-to-noise ratio snr: 1/snr for eps (x0 = (x - sigma eps)/alpha),
    1 for x0, 1/(1 + snr) for v (x0 = alpha x - sigma v, and sigma^2 = 1/(1 + snr))."""
    if prediction == "eps":
        return 1 / snr
    if prediction == "x0":
        return torch.ones_like(snr)
    if prediction == "v":
        return 1 / (1 + snr)
    raise ValueError(f"unknown prediction target {prediction!r}")


def loss_weight(weighting: str, prediction: str, snr: torch.Tensor, snr_gamma: float) -> torch.Tensor:
    """The weight of each sample's target loss.

    uniform: 1, each target's plain loss (which in x0-space weighs timesteps by snr for eps, 1 for x0 and
    1 + snr for v). min_snr (Hang et al. 2023): the x0-space weight min(snr, gamma) for every target, so that a
    sweep over targets compares one objective: min(snr, gamma) / snr for eps, min(snr, gamma) for x0 and
    min(snr, gamma) / (snr + 1) for v.
    """
    if weighting == "uniform":
        return torch.ones_like(snr)
    if weighting == "min_snr":
        return snr.clamp(max=snr_gamma) * x0_error_per_target_error(prediction, snr)
    raise ValueError(f"unknown weighting {weighting!r}")


def variance_fraction(output: torch.Tensor) -> torch.Tensor:
    """The network's variance channels v in [-1, 1] (nominally) as the interpolation fraction (v + 1) / 2."""
    return (output + 1) / 2


def interpolated_log_variance(fraction: torch.Tensor, log_small, log_large) -> torch.Tensor:
    """log sigma^2 = f log beta_t + (1 - f) log beta~_t (Nichol & Dhariwal 2021, Eq. 15)."""
    return fraction * log_large + (1 - fraction) * log_small


def normal_kl(mean1: torch.Tensor, log_var1, mean2: torch.Tensor, log_var2) -> torch.Tensor:
    """KL(N(mean1, exp(log_var1)) || N(mean2, exp(log_var2))) per element, in nats."""
    log_var1 = torch.as_tensor(log_var1, dtype=mean1.dtype, device=mean1.device)
    log_var2 = torch.as_tensor(log_var2, dtype=mean1.dtype, device=mean1.device)
    return 0.5 * (
        log_var2 - log_var1 - 1 + torch.exp(log_var1 - log_var2) + (mean1 - mean2) ** 2 * torch.exp(-log_var2)
    )


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor, bins: int = 256
) -> torch.Tensor:
    """log p(x) per element of images x in [-1, 1] with `bins` levels under N(mean, exp(log_scale)^2) integrated
    over each level's bin of width 2 / (bins - 1), the two end bins extended to -inf and +inf (Ho et al. 2020,
    Eq. 13).

    Each bin's mass is written as a difference of two log-CDFs taken on the side of the distribution where both
    are small (log Phi(b) + log(1 - exp(log Phi(a) - log Phi(b)))), so that it stays accurate far into either
    tail instead of rounding to 0.
    """
    half_bin = 1.0 / (bins - 1)
    inv_scale = torch.exp(-log_scale)
    upper = (x - mean + half_bin) * inv_scale
    lower = (x - mean - half_bin) * inv_scale
    # Phi(upper) - Phi(lower) = Phi(-lower) - Phi(-upper): take the side whose arguments are <= 0 mostly.
    flip = lower > 0
    b = torch.where(flip, -lower, upper)
    a = torch.where(flip, -upper, lower)
    log_b, log_a = torch.special.log_ndtr(b), torch.special.log_ndtr(a)
    middle = log_b + torch.log(-torch.expm1((log_a - log_b).clamp(max=-1e-30)))
    lowest = torch.special.log_ndtr(upper)  # P(X <= x + half bin), the bin of -1
    highest = torch.special.log_ndtr(-lower)  # P(X >= x - half bin), the bin of +1
    edge = 1 - half_bin
    return torch.where(x < -edge, lowest, torch.where(x > edge, highest, middle))


def bits_per_dim(nats: torch.Tensor) -> torch.Tensor:
    """Per-image nats summed over all but the batch dimension, as bits per dimension."""
    return nats.flatten(1).mean(dim=1) / math.log(2)


def check_objective(model: nn.Module, prediction, weighting, snr_gamma, variance, vlb_weight) -> None:
    """The diffusion's objective settings, each reported with its key, its value and what is allowed."""
    check_choice("diffusion.prediction", prediction, PREDICTIONS)
    check_choice("diffusion.weighting", weighting, WEIGHTINGS)
    check_choice("diffusion.variance", variance, VARIANCES)
    for key, value in (("snr_gamma", snr_gamma), ("vlb_weight", vlb_weight)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"diffusion.{key}={value!r} must be a finite number >= 0")
    if weighting == "min_snr" and snr_gamma <= 0:
        raise ConfigError(f"diffusion.snr_gamma={snr_gamma!r} must be > 0 with diffusion.weighting=min_snr")
    learns_sigma = bool(getattr(model, "learn_sigma", False))
    if learns_sigma != (variance == "learned_range"):
        raise ConfigError(
            f"diffusion.variance={variance!r} with model.learn_sigma={str(learns_sigma).lower()}: learned_range "
            "needs the network's variance channels (model.learn_sigma=true), and only learned_range uses them"
        )
