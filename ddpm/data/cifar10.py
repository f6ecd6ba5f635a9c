"""CIFAR-10 through torchvision: 50,000 training and 10,000 test images, 32x32 RGB, 10 classes."""

from pathlib import Path

from torch.utils.data import Dataset

from ddpm.config.errors import ConfigError, DatasetNotFoundError
from ddpm.config.type_checks import config_types
from ddpm.data.transforms import to_model_range

ARCHIVE = "cifar-10-python.tar.gz"


@config_types("dataset")
def cifar10(
    root: str,
    split: str = "train",
    image_size: int = 32,
    channels: int = 3,
    num_classes: int = 10,
    random_flip: bool = True,
    download: bool = True,
) -> Dataset:
    """The train or test split of CIFAR-10 in [-1, 1]; flips apply to the train split only.

    Reads `root/cifar-10-batches-py`, or extracts `root/cifar-10-python.tar.gz`, or downloads it.
    """
    if (image_size, channels, num_classes) != (32, 3, 10):
        raise ConfigError(
            f"dataset.image_size={image_size}, dataset.channels={channels}, dataset.num_classes={num_classes}: "
            "CIFAR-10 images are 32x32 RGB in 10 classes; use dataset=folder for other images"
        )
    if split not in ("train", "test"):
        raise ConfigError(f"split={split!r} is not one of ['train', 'test']")
    from torchvision import datasets  # here: importing torchvision takes seconds (it loads torch._dynamo)

    flips = random_flip and split == "train"
    transform = to_model_range(image_size, channels, flips)
    try:
        dataset = datasets.CIFAR10(root, train=split == "train", transform=transform, download=download)
    except Exception as error:  # torchvision raises RuntimeError, URLError or OSError, depending on the failure
        raise DatasetNotFoundError(
            f"CIFAR-10 could not be loaded from dataset.root={root} ({type(error).__name__}: {error}). "
            f"Without internet access, download {ARCHIVE} (163 MB) from "
            "https://www.cs.toronto.edu/~kriz/cifar.html on another machine and place it at "
            f"{Path(root) / ARCHIVE}; it is checked and extracted on the next run. To keep the data elsewhere, "
            "set the environment variable DDPM_DATA_DIR or the override paths.data_dir=DIR."
        ) from error
    dataset.random_flip = flips  # lets ddpm.data.device do this transform itself, on the training device
    return dataset
