"""The images an evaluation scores, drawn by index: image i from its own seed (seed, i) and, for a
class-conditional model, of class i mod C, so a shard holds exactly the images of the unsharded run."""

import numpy as np
import torch

from ddpm.diffusion.gaussian import GaussianDiffusion
from ddpm.diffusion.generation import as_arrays, class_labels, draw_images
from ddpm.evaluation.settings import EvalSettings


def generate(
    diffusion: GaussianDiffusion,
    sampler,
    settings: EvalSettings,
    images: range,
    device: torch.device,
    *,
    seed: int,
    guidance_scale: float,
    precision: str,
) -> dict[str, np.ndarray]:
    """The images with indices `images` (uint8 N x H x W x C) and, when conditional, their classes; every
    index is drawn, the last partial batch too."""
    labels = class_labels(settings.num_samples, diffusion.model.num_classes)
    arrays = as_arrays(
        draw_images(
            diffusion,
            sampler,
            images=images,
            batch_size=settings.batch_size,
            seed=seed,
            device=device,
            labels=labels,
            use_ema=settings.use_ema,
            guidance_scale=guidance_scale,
            precision=precision,
        )
    )
    if len(arrays["arr_0"]) != len(images):
        raise RuntimeError(f"drew {len(arrays['arr_0'])} images where {len(images)} were asked for")
    return arrays
