"""DPM-Solver++(2M), deterministic or in its SDE form."""

import math

import torch

from ddpm.config.type_checks import config_types
from ddpm.diffusion.objectives import Denoiser
from ddpm.diffusion.samplers.common import (
    Callback,
    Generators,
    alphas_cumprod_list,
    check_eta,
    gaussian_like,
    spaced_timesteps,
)


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
    check_eta(eta)
    timesteps = spaced_timesteps(len(betas), steps, "uniform")
    alphas_cumprod = alphas_cumprod_list(betas)
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
