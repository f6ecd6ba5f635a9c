"""Any directory of images; class labels come from sub-folder names when every image is in one."""

from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ddpm.config.errors import ConfigError, DatasetNotFoundError
from ddpm.config.type_checks import config_types
from ddpm.data.transforms import to_model_range

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class FolderImages(Dataset):
    """Images under `path` (searched recursively); label = index of the top-level sub-folder, else -1."""

    def __init__(self, path: str, image_size: int, channels: int, random_flip: bool):
        self.root = Path(path)
        if not self.root.is_dir():
            raise DatasetNotFoundError(f"dataset.path={path} is not a directory")
        files = sorted(p for p in self.root.rglob("*") if p.is_file() and not _hidden(p.relative_to(self.root)))
        others = [p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
        if others:
            raise ConfigError(
                f"dataset.path={path} holds files that are not images, e.g. {', '.join(map(str, others[:3]))} "
                f"({len(others)} in all; images end in {sorted(IMAGE_SUFFIXES)}). Move them out of the folder."
            )
        if not files:
            raise DatasetNotFoundError(
                f"dataset.path={path} holds no images (looked for {sorted(IMAGE_SUFFIXES)}, in sub-folders too)"
            )
        for file in files:  # reads headers only: a broken file is reported now, not hours into training
            _check_image(file, self.root)
        self.files = files
        top_folders = [p.relative_to(self.root).parts[0] if p.parent != self.root else None for p in self.files]
        self.classes = sorted(set(top_folders)) if None not in top_folders else []
        index = {name: label for label, name in enumerate(self.classes)}
        self.labels = [index.get(folder, -1) for folder in top_folders]
        self.transform = to_model_range(image_size, channels, random_flip)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path = self.files[index]
        try:
            with Image.open(path) as image:
                return self.transform(image), self.labels[index]
        except (UnidentifiedImageError, OSError) as error:
            raise ConfigError(f"{path} in dataset.path={self.root} is not a readable image: {error}") from error
        except ConfigError as error:  # pixels of no standard range
            raise ConfigError(f"{path} in dataset.path={self.root}: {error}") from None


def _hidden(relative: Path) -> bool:
    """.DS_Store, .git/... and the like are not part of a dataset."""
    return any(part.startswith(".") for part in relative.parts)


def _check_image(path: Path, root: Path) -> None:
    try:
        with Image.open(path):
            pass
    except (UnidentifiedImageError, OSError) as error:
        raise ConfigError(f"{path} in dataset.path={root} is not a readable image: {error}") from error


@config_types("dataset")
def folder(
    path: str,
    split: str = "train",
    image_size: int = 64,
    channels: int = 3,
    num_classes: int | None = None,
    random_flip: bool = True,
) -> Dataset | None:
    """All images as the train split; a folder has no test split (returns None for it)."""
    if channels not in (1, 3):
        raise ConfigError(f"dataset.channels={channels} must be 1 (grayscale) or 3 (RGB)")
    if split == "test":
        return None
    dataset = FolderImages(path, image_size, channels, random_flip)
    if num_classes is not None and num_classes != len(dataset.classes):
        raise ConfigError(
            f"dataset.num_classes={num_classes}, but dataset.path={path} has {len(dataset.classes)} class "
            f"sub-folders {dataset.classes[:10]}; set dataset.num_classes={len(dataset.classes) or 'null'}"
        )
    return dataset
