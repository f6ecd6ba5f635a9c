"""Training batches gathered, flipped and scaled to [-1, 1] on the training device from one in-memory tensor,
so the training step never waits on DataLoader workers or PIL. Same order, flips and resume state as TrainingBatches.
"""

import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from einops import rearrange
from torch.utils.data import Dataset, TensorDataset

from ddpm.data.loader import ResumableBatches


@dataclass
class InMemoryImages:
    """A whole training split as tensors."""

    images: torch.Tensor  # (N, C, H, W): uint8 0..255, or float already in [-1, 1]
    labels: torch.Tensor  # (N,) int64
    random_flip: bool


def in_memory_images(dataset: Dataset) -> InMemoryImages | None:
    """The dataset's images as tensors when DeviceBatches would give the model exactly what it gives, else None."""
    torchvision_datasets = sys.modules.get("torchvision.datasets")  # not imported: not a CIFAR-10 dataset
    if torchvision_datasets and isinstance(dataset, torchvision_datasets.CIFAR10) and hasattr(dataset, "random_flip"):
        # Only ddpm.data.cifar10 sets random_flip; its transform at 32x32 is an optional flip and v/255*2-1.
        images = rearrange(torch.from_numpy(dataset.data), "n h w c -> n c h w").contiguous()
        return InMemoryImages(images, torch.as_tensor(dataset.targets, dtype=torch.int64), dataset.random_flip)
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        # The digits: __getitem__ hands out these tensors unchanged, so nothing is converted and nothing flipped.
        images, labels = dataset.tensors
        if images.dim() == 4 and images.is_floating_point() and labels.dim() == 1 and not labels.is_floating_point():
            return InMemoryImages(images.float(), labels.long(), random_flip=False)
    return None


class DeviceBatches(ResumableBatches):
    """Shuffled full batches of (images, labels) on `device`, forever; a drop-in for TrainingBatches.

    Batch order and rank shares come from EpochOrder and each batch's flips from its seed, drawn as
    RandomHorizontalFlip draws them under SeededBatches, so both classes give the same batches and resume alike.
    """

    def __init__(
        self,
        data: InMemoryImages,
        batch_size: int,
        *,
        seed: int,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
    ):
        super().__init__(len(data.images), batch_size, seed=seed, rank=rank, world_size=world_size)
        self.device = torch.device(device)
        self.images, self.labels = data.images.to(device), data.labels.to(device)  # copied once, not per batch
        self.random_flip = data.random_flip
        self._order: Iterator[tuple[int, list[int]]] | None = None

    def restart(self) -> None:
        self._order = None

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._order is None:
            self._order = iter(self.order())
        seed, indices = next(self._order)
        index = self._to_device(torch.tensor(indices))
        images = self.images[index]
        if self.random_flip:
            # RandomHorizontalFlip draws torch.rand(1) < 0.5 per image, in batch order, from the batch's seed;
            # torch.rand(n) from a generator with that seed yields the same numbers, so the same images flip.
            flip = torch.rand(len(indices), generator=torch.Generator().manual_seed(seed)) < 0.5
            images = torch.where(self._to_device(flip)[:, None, None, None], images.flip(-1), images)
        if images.dtype == torch.uint8:
            images = images.float() / 127.5 - 1  # ToTensor + Normalize(0.5, 0.5), to float32 rounding
        labels = self.labels[index]
        self.advance()
        return images, labels

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        # From pinned memory the copy is asynchronous: the host goes on to the next step without waiting for the GPU.
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)
