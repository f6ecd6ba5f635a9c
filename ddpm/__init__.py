"""ddpm: Denoising Diffusion Probabilistic Models, configured with Hydra.

The Python API: a network (`UNet`), a noise schedule (`*_betas`), the diffusion around them
(`GaussianDiffusion`), the `EMA` of the weights, samplers in `ddpm.diffusion.samplers`, and `load_diffusion`
for a trained checkpoint.

The subpackages, each importing only those before it in this list (README: Layout):
config -> runtime, io, model, data -> diffusion -> evaluation, training -> tasks.
"""

import os

# cuBLAS reads its workspace setting once, at its first call in the process: set before anything can make one,
# so that a later job of the same process (an in-process sweep, a test session, a notebook) may still ask for
# deterministic kernels (trainer.deterministic=true). A setting of the user's own stands.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

from ddpm.config.moves import install_moved_module_finder
from ddpm.diffusion.build import build_diffusion, load_diffusion
from ddpm.diffusion.gaussian import GaussianDiffusion
from ddpm.diffusion.samplers import ddpm_ancestral
from ddpm.diffusion.schedules import cosine_betas, dns_betas, dnst_betas, linear_betas
from ddpm.model.ema import EMA
from ddpm.model.unet import UNet

install_moved_module_finder()

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
