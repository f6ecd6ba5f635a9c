"""Image transforms shared by the datasets that read files."""

from functools import partial
from typing import Any

import numpy as np
from PIL import Image

from ddpm.config.errors import ConfigError

# Pillow's modes of more than 8 bits per pixel, which its convert("L") clips at 255 instead of scaling.
SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}  # 16-bit PNGs open as I;16 (or I)
FLOAT_MODE = "F"  # 32-bit float, e.g. TIFF: taken as [0, 1]


def to_8bit(image: Image.Image) -> Image.Image:
    """A grey image of 16 bits (0..65535) or of floats in [0, 1] as 8-bit grey, scaled to full range; other
    images as they are (Pillow reduces 16-bit RGB PNGs to 8 bits itself). Values outside those ranges have no
    standard meaning: refused."""
    if image.mode not in SIXTEEN_BIT_MODES | {FLOAT_MODE}:
        return image
    values = np.asarray(image, dtype=np.float64)
    low, high = (0.0, 1.0) if image.mode == FLOAT_MODE else (0.0, 65535.0)
    if values.size and not (values.min() >= low and values.max() <= high):
        raise ConfigError(
            f"its pixels (mode {image.mode}) range over [{values.min():g}, {values.max():g}], outside the "
            f"[{low:g}, {high:g}] this mode is read in; convert the images to 8 or 16-bit PNG"
        )
    return Image.fromarray(np.round(values * (255.0 / high)).astype(np.uint8), "L")


def _convert(image: Image.Image, mode: str) -> Image.Image:
    return to_8bit(image).convert(mode)


def to_model_range(image_size: int, channels: int, random_flip: bool) -> Any:
    """PIL image -> float tensor in [-1, 1], resized and center-cropped to a square, optionally flipped."""
    from torchvision import transforms  # here: importing torchvision takes seconds (it loads torch._dynamo)

    steps = [
        transforms.Lambda(partial(_convert, mode="L" if channels == 1 else "RGB")),  # picklable for workers
        transforms.Resize(image_size),
        transforms.CenterCrop(image_size),
    ]
    if random_flip:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Normalize([0.5] * channels, [0.5] * channels)]
    return transforms.Compose(steps)
