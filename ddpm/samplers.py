"""Samplers: plain functions that turn noise x_T into images with a denoiser.

Every sampler has the same signature,

    sampler(denoise, x, betas, *, generator=None, callback=None, **settings) -> x_0

where `denoise(x_t, t)` returns a `ddpm.objectives.Prediction` (the predicted noise and clean image, and the
learned variance where there is one) for integer timesteps `t` (shape [B], values in 0..T-1), whatever the
network was trained to predict; `x` is the starting noise x_T, and `betas` the noise schedule (float, length
T). Randomness comes only from `generator`, so a seeded generator gives the same images; a list of generators,
one per image, makes each image's noise independent of the other images in the batch. `callback`, when given,
is called after every network evaluation with a dict {"i": evaluation index, "t": timestep, "x": the new x,
"steps": the number of network evaluations the sampler makes in all}. Schedule quantities are computed in
float64 and applied as Python floats, so tiny or huge betas stay finite. Clamping the final image to [-1, 1]
is the caller's job.
"""

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ddpm.checks import config_types
from ddpm.errors import ConfigError
from ddpm import objectives
from ddpm.objectives import Denoiser, Prediction, interpolated_log_variance

Callback = Callable[[dict[str, Any]], None]
Generators = torch.Generator | Sequence[torch.Generator] | None  # one for the batch, or one per image

# The fixed variances as fractions of the way from log beta~_t to log beta_t (see ddpm.objectives).
FIXED_FRACTIONS = {"fixed_large": 1.0, "fixed_small": 0.0}
SPACINGS = ("uniform", "quadratic")


def gaussian_like(x: torch.Tensor, generator: Generators) -> torch.Tensor:
    """N(0, I) noise of x's shape, device and dtype, from one generator or from one generator per image."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    if len(generator) != x.shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {x.shape[0]} images")
    return torch.stack([torch.randn(x.shape[1:], generator=g, device=x.device, dtype=x.dtype) for g in generator])


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
        raise ConfigError(f"sampler.variance={variance!r} is not one of {[None, *FIXED_FRACTIONS]} "
                          "(null: the diffusion's variance, learned or fixed)")  # fmt: skip
    num_timesteps = len(betas)
    timesteps = list(range(num_timesteps - 1, -1, -1)) if steps is None else spaced_timesteps(num_timesteps, steps)
    alphas_cumprod = _alphas_cumprod(betas)
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
            if isinstance(fraction, float):
                std = math.sqrt(beta if fraction == 1.0 else posterior_variance)
            else:  # log-space interpolation; the floor keeps log(0) out where beta~ underflows
                log_large, log_small = math.log(max(beta, 1e-300)), math.log(max(posterior_variance, 1e-300))
                std = torch.exp(0.5 * interpolated_log_variance(fraction.to(x.dtype), log_small, log_large))
            x = mean + std * gaussian_like(x, generator)
        else:
            x = mean
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "steps": len(timesteps)})
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
    return objectives.alphas_cumprod(betas).tolist()


def _clip_x0(x: torch.Tensor, x0: torch.Tensor, alpha_bar: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(eps, x0) with x0 clipped to [-1, 1] and the noise re-derived from it, so that x_t = sqrt(alpha_bar) x0 +
    sqrt(1 - alpha_bar) eps still holds: the step then moves towards an image inside the data's range."""
    x0 = x0.clamp(-1, 1)
    return (x - math.sqrt(alpha_bar) * x0) * (1 / math.sqrt(1 - alpha_bar)), x0


def _check_eta(eta: float) -> None:
    if not (math.isfinite(eta) and eta >= 0):
        raise ConfigError(f"sampler.eta={eta!r} must be a number >= 0 (0 = deterministic DDIM, 1 = DDPM-like)")


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
    _check_eta(eta)
    timesteps = spaced_timesteps(len(betas), steps, spacing)
    alphas_cumprod = _alphas_cumprod(betas)
    for i, t in enumerate(timesteps):
        a_t = alphas_cumprod[t]
        a_next = alphas_cumprod[timesteps[i + 1]] if i + 1 < len(timesteps) else 1.0
        sigma = eta * math.sqrt((1 - a_next) / (1 - a_t) * (1 - a_t / a_next))
        eps, x0, _ = denoise(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long))
        if clip_denoised:
            eps, x0 = _clip_x0(x, x0, a_t)
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
    denoise: Denoiser,
    x: torch.Tensor,
    betas: torch.Tensor,
    *,
    steps: int = 20,
    eta: float = 0.0,
    clip_denoised: bool = True,
    generator: Generators = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) in data-prediction form on the discrete schedule, and with
    eta > 0 its stochastic (SDE) form.

    `steps` network evaluations at uniformly spaced timesteps T-1 ... 0: a first-order step, second-order
    multistep updates to t = 0, then the final denoising step returns the x0 predicted at t = 0. With
    h = lambda_s - lambda_t (lambda = log(alpha / sigma)) a step is

        x_s = (sigma_s / sigma_t) e^(-eta h) x_t + alpha_s (1 - e^(-(1 + eta) h)) D + sigma_s sqrt(1 - e^(-2 eta h)) z

    with D the second-order data estimate: eta = 0 is the deterministic ODE solver (`generator` unused), eta = 1
    the SDE solver of Lu et al. 2022 (Sec. 5) that injects the reverse SDE's noise, in between a partial churn.
    clip_denoised clips each predicted x0 to [-1, 1].
    """
    _check_eta(eta)
    timesteps = spaced_timesteps(len(betas), steps, "uniform")
    alphas_cumprod = _alphas_cumprod(betas)
    alpha = [math.sqrt(a) for a in alphas_cumprod]
    sigma = [math.sqrt(1 - a) for a in alphas_cumprod]
    lam = [0.5 * (math.log(a) - math.log1p(-a)) for a in alphas_cumprod]  # log(alpha_t / sigma_t)
    previous_x0, previous_h = None, 0.0
    for i, t in enumerate(timesteps):
        x0 = denoise(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)).x0
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
            x = (sigma[s] / sigma[t] * math.exp(-eta * h)) * x - (alpha[s] * math.expm1(-(1 + eta) * h)) * denoised
            if eta > 0:
                x = x + sigma[s] * math.sqrt(-math.expm1(-2 * eta * h)) * gaussian_like(x, generator)
            previous_x0, previous_h = x0, h
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "steps": len(timesteps)})
    return x


@config_types("sampler")
@torch.no_grad()
def heun(
    denoise: Denoiser,
    x: torch.Tensor,
    betas: torch.Tensor,
    *,
    steps: int = 18,
    spacing: str = "quadratic",
    sigma_max: float | None = None,
    clip_denoised: bool = True,
    generator: Generators = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Heun's second-order method on the probability-flow ODE (Karras et al. 2022, Algorithm 1, deterministic).

    In the variables of Karras et al., x~ = x / alpha and s = sigma / alpha, the ODE of this VP schedule is
    dx~/ds = eps(x, t(s)). `steps` timesteps T-1 ... 0 (spaced as `spacing`: quadratic by default, denser
    near t = 0, as EDM's rho = 7 spacing is near sigma = 0) are visited; between consecutive
    ones an Euler step is corrected by the slope at its end (two network evaluations), and from the last one,
    t = 0, the step to s = 0 is the predicted x0: 2 * steps - 1 evaluations in all. The state is kept in x
    itself, x_s = (alpha_s / alpha_t) x_t + alpha_s (s_s - s_t) eps, so that alpha_t ~ 0 stays finite.
    `generator` is unused.

    The trapezoid's correction of an interval is (1 - s_t / s_s) (D_t - D_s) / 2 in x~, D the denoised estimate:
    an interval from a huge s_t magnifies any change of D. The cosine schedule's clipped last beta puts
    s_{T-1} at about 2e4 (linear: 157); `sigma_max` (e.g. EDM's 80) then starts at the last timestep with
    s <= sigma_max, from the same N(0, I) noise (None: at T-1, as every sampler here).

    clip_denoised clips each predicted x0 to [-1, 1] and re-derives the slope from it, as ddim and dpm_solver
    do (EDM's sampler does not clip; clip_denoised=false is Algorithm 1 exactly). On a briefly trained model
    the clipping matters more than the solver's order (the quickstart's digits, 50 uniform steps: FID 63
    unclipped, 54 clipped, where DDIM's clipped ODE ends at 53 even with 1000 steps).
    """
    alphas_cumprod = _alphas_cumprod(betas)
    num_timesteps = len(betas)
    if sigma_max is not None:
        if not (math.isfinite(sigma_max) and sigma_max > 0):
            raise ConfigError(f"sampler.sigma_max={sigma_max!r} must be a number > 0, or null (start at T-1)")
        num_timesteps = sum(1 for a in alphas_cumprod if (1 - a) / a <= sigma_max**2)
        if num_timesteps < steps:
            raise ConfigError(f"sampler.steps={steps!r}: only {num_timesteps} timesteps have s <= "
                              f"sampler.sigma_max={sigma_max}; lower the steps or raise sigma_max")  # fmt: skip
    timesteps = spaced_timesteps(num_timesteps, steps, spacing)
    evaluations = 2 * len(timesteps) - 1

    def evaluate(x: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps, x0) at timestep t."""
        eps, x0, _ = denoise(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long))
        return _clip_x0(x, x0, alphas_cumprod[t]) if clip_denoised else (eps, x0)

    def report(i: int, t: int, x: torch.Tensor) -> None:
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "steps": evaluations})

    for i, t in enumerate(timesteps):
        eps, x0 = evaluate(x, t)
        if i + 1 == len(timesteps):
            x = x0
            report(2 * i, t, x)
            break
        s = timesteps[i + 1]
        a_t, a_s = alphas_cumprod[t], alphas_cumprod[s]
        ratio = math.sqrt(a_s / a_t)
        # alpha_s (s_s - s_t), written so that neither term divides by a tiny alpha_t alone
        slope_coef = math.sqrt(1 - a_s) - math.sqrt(a_s * (1 - a_t) / a_t)
        euler = ratio * x + slope_coef * eps
        report(2 * i, t, euler)
        eps_end, _ = evaluate(euler, s)
        x = ratio * x + slope_coef * (0.5 * (eps + eps_end))
        report(2 * i + 1, s, x)
    return x
