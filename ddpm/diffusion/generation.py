"""Drawing N images in batches: the one image generator behind task=sample, task=evaluate, the training grids
and FID during training.

Image i draws all of its randomness (its starting noise x_T and every noise a stochastic sampler adds) from a
noise stream of its own, keyed with (seed, i) (ddpm.diffusion.samplers.ImageNoise: the whole batch in one pass). So image i is the same whatever the batch size, the first N images
of a 50k run are an N-image run, and a shard's images do not depend on how many shards there are.
"""

import dataclasses
import functools
import sys
from collections.abc import Callable, Iterator

import numpy as np
import torch

from ddpm.diffusion.gaussian import GaussianDiffusion
from ddpm.diffusion.samplers import ImageNoise
from ddpm.io.images import to_uint8


def image_seed(seed: int, index: int) -> int:
    """Independent streams per (seed, image index): any range of images is reproducible on its own."""
    return int(np.random.SeedSequence([seed, index]).generate_state(2, np.uint64)[0] >> 1)


def balanced_labels(num_images: int, classes: list[int]) -> torch.Tensor:
    """Image i gets classes[i mod len(classes)]: an equal share per class, and a label that depends on i alone."""
    return torch.tensor(classes)[torch.arange(num_images) % len(classes)]


def class_labels(num_images: int, num_classes: int | None) -> torch.Tensor | None:
    """Every class of a conditional model in turn (image i: class i mod C); None for an unconditional one."""
    return balanced_labels(num_images, list(range(num_classes))) if num_classes else None


@dataclasses.dataclass
class ImageBatch:
    start: int  # the index of its first image
    images: torch.Tensor  # N x C x H x W in [-1, 1]
    labels: torch.Tensor | None  # N classes, on the CPU

    @functools.cached_property
    def pixels(self) -> np.ndarray:
        """uint8 N x H x W x C, the guided-diffusion npz convention."""
        return to_uint8(self.images)


def draw_images(
    diffusion: GaussianDiffusion,
    sampler: Callable[..., torch.Tensor],
    *,
    images: range,
    batch_size: int,
    seed: int,
    device: torch.device,
    labels: torch.Tensor | None = None,
    use_ema: bool = True,
    guidance_scale: float = 0.0,
    precision: str = "fp32",
) -> Iterator[ImageBatch]:
    """The images with the indices in `images`, `batch_size` at a time; `labels` holds the class of every image
    index (from 0) when the model is class-conditional."""
    for start in range(images.start, images.stop, batch_size):
        indices = range(start, min(start + batch_size, images.stop))
        noise = ImageNoise([image_seed(seed, i) for i in indices], device)
        batch_labels = labels[indices.start : indices.stop] if labels is not None else None
        x = diffusion.sample(
            len(indices),
            device,
            batch_labels.to(device) if batch_labels is not None else None,
            use_ema=use_ema,
            generator=noise,
            sampler=sampler,
            progress=sys.stderr.isatty(),
            guidance_scale=guidance_scale,
            precision=precision,
        )
        yield ImageBatch(start, x, batch_labels)


def as_arrays(batches: Iterator[ImageBatch]) -> dict[str, np.ndarray]:
    """{"arr_0": uint8 N x H x W x C, "arr_1": labels (conditional models only)}: the npz layout of samples."""
    pixels, labels = [], []
    for batch in batches:
        pixels.append(batch.pixels)
        if batch.labels is not None:
            labels.append(batch.labels.numpy())
    arrays = {"arr_0": np.concatenate(pixels)}
    if labels:
        arrays["arr_1"] = np.concatenate(labels)
    return arrays
