"""The handwritten digits that scikit-learn ships: 1,797 real 8x8 grayscale images, 10 classes, offline."""

import importlib.util
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from ddpm.config.errors import ConfigError, DatasetNotFoundError
from ddpm.config.type_checks import config_types


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 images (N x 8 x 8, values 0..16) and their classes, read from the CSV file inside
    scikit-learn's package, as sklearn.datasets.load_digits does, without importing scikit-learn (seconds)."""
    package = importlib.util.find_spec("sklearn")
    if package is None or not package.submodule_search_locations:
        raise DatasetNotFoundError("dataset=digits reads scikit-learn's copy of the digits: pip install scikit-learn")
    table = np.loadtxt(
        Path(package.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz", delimiter=","
    )
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)


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
    pixels, classes = load_digits()
    needed = len(pixels) * image_size**2 * 4 * 2  # float32, upscaled and then shifted to [-1, 1]
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if needed > available:
        raise ConfigError(
            f"dataset.image_size={image_size}: the {len(pixels)} digits at that size take {needed / 2**30:.1f} GiB "
            f"in memory, more than the {available / 2**30:.1f} GiB free; choose a smaller dataset.image_size"
        )
    images = torch.tensor(pixels, dtype=torch.float32).unsqueeze(1) / 16  # pixel values are 0..16
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", antialias=True)
    images = (images.clamp(0, 1) * 2 - 1).contiguous()
    labels = torch.tensor(classes, dtype=torch.long)
    # A fixed permutation so the held-out split is the same on every machine and has every class.
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    num_test = round(len(labels) * test_fraction)
    chosen = order[:num_test] if split == "test" else order[num_test:]
    return TensorDataset(images[chosen], labels[chosen])
