"""Batches for the training loop and the test loss."""

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from ddpm.errors import ConfigError


def training_batches(
    dataset: Dataset, batch_size: int, *, num_workers: int, seed: int, pin_memory: bool = False
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled full batches, epoch after epoch, forever; the order depends on `seed` alone."""
    if batch_size > len(dataset):
        raise ConfigError(
            f"trainer.batch_size={batch_size} is larger than the training set ({len(dataset)} images)"
        )
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )
    while True:
        yield from loader


def evaluation_batches(dataset: Dataset, batch_size: int, *, num_workers: int) -> DataLoader:
    """The test split in a fixed order, so the test loss is comparable from one log to the next."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
