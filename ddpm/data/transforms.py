"""Image transforms shared by the datasets that read files."""

from functools import partial
from typing import Any

from PIL import Image


def _convert(image: Image.Image, mode: str) -> Image.Image:
    return image.convert(mode)


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
