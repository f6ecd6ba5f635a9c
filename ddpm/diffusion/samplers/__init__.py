"""Samplers: plain functions that turn noise x_T into images with a denoiser.

Every sampler has the same signature,

    sampler(denoise, x, betas, *, generator=None, callback=None, **settings) -> x_0

where `denoise(x_t, t)` returns a `ddpm.diffusion.objectives.Prediction` (the predicted noise and clean image, and the
learned variance where there is one) for integer timesteps `t` (shape [B], values in 0..T-1), whatever the
network was trained to predict; `x` is the starting noise x_T, and `betas` the noise schedule (float, length
T). Randomness comes only from `generator`, so a seeded generator gives the same images; an `ImageNoise` (a
stream per image) makes each image's noise independent of the other images in the batch. `callback`, when given,
is called after every network evaluation with a dict {"i": evaluation index, "t": timestep, "x": the new x,
"steps": the number of network evaluations the sampler makes in all}. Schedule quantities are computed in
float64 and applied as Python floats, so tiny or huge betas stay finite. Clamping the final image to [-1, 1]
is the caller's job.
"""

from ddpm.diffusion.samplers.ancestral import ddpm_ancestral
from ddpm.diffusion.samplers.common import FIXED_FRACTIONS, Callback, Generators, gaussian_like, spaced_timesteps
from ddpm.diffusion.samplers.image_noise import ImageNoise
from ddpm.diffusion.samplers.implicit import ddim
from ddpm.diffusion.samplers.multistep import dpm_solver
from ddpm.diffusion.samplers.probability_flow import heun

__all__ = [
    "FIXED_FRACTIONS",
    "Callback",
    "Generators",
    "ImageNoise",
    "ddim",
    "ddpm_ancestral",
    "dpm_solver",
    "gaussian_like",
    "heun",
    "spaced_timesteps",
]
