"""The handwritten digits that scikit-learn ships: 1,797 real 8x8 grayscale images, 10 classes, offline."""

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import Dataset, TensorDataset

from ddpm.checks import config_types
from ddpm.errors import ConfigError


@config_types("dataset")
def digits(
    split: str = "train",
    image_size: int = 16,
    channels: int = 1,
    num_classes: int = 10,
    test_fraction: float = 0.1,
) -> Dataset:
    """The digits upscaled to image_size (bilinear) in [-1, 1]; a fixed shuffled `test_fraction` is held out."""
    if (channels, num_classes) != (1, 10):
        raise ConfigError(
            f"dataset.channels={channels}, dataset.num_classes={num_classes}: the digits are grayscale (1) in 10 classes"
        )
    if image_size < 8:
        raise ConfigError(f"dataset.image_size={image_size} must be >= 8 (the digits are 8x8)")
    if not 0 < test_fraction < 1:
        raise ConfigError(f"dataset.test_fraction={test_fraction} must be in (0, 1)")
    if split not in ("train", "test"):
        raise ConfigError(f"split={split!r} is not one of ['train', 'test']")
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16  # pixel values are 0..16
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", antialias=True)
    images = (images.clamp(0, 1) * 2 - 1).contiguous()
    labels = torch.tensor(data.target, dtype=torch.long)
    # A fixed permutation so the held-out split is the same on every machine and has every class.
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    num_test = round(len(labels) * test_fraction)
    chosen = order[:num_test] if split == "test" else order[num_test:]
    return TensorDataset(images[chosen], labels[chosen])
