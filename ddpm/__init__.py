"""ddpm: Denoising Diffusion Probabilistic Models, configured with Hydra.

The Python API: a network (`UNet`), a noise schedule (`*_betas`), the diffusion around them
(`GaussianDiffusion`), the `EMA` of the weights, samplers in `ddpm.samplers`, and `load_diffusion`
for a trained checkpoint.
"""

from ddpm.build import build_diffusion, load_diffusion
from ddpm.diffusion import GaussianDiffusion
from ddpm.ema import EMA
from ddpm.samplers import ddpm_ancestral
from ddpm.schedules import cosine_betas, dns_betas, dnst_betas, linear_betas
from ddpm.unet import UNet

__all__ = [
    "EMA",
    "GaussianDiffusion",
    "UNet",
    "build_diffusion",
    "cosine_betas",
    "ddpm_ancestral",
    "dns_betas",
    "dnst_betas",
    "linear_betas",
    "load_diffusion",
]
