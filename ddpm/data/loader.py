"""Batches for the training loop (resumable at any batch) and for the test loss.

A resumed run must see the same images, in the same order, with the same augmentation, as a run that was never
stopped. So nothing here draws from a global random stream: epoch e's order and each image's augmentation seed
come from a generator seeded with (seed, e), and each batch is loaded under its own seed, in whichever worker.
"""

import atexit
import multiprocessing
import signal
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ddpm.config.errors import ConfigError


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGINT and SIGTERM to the main process, which stops at a step boundary with a
    checkpoint (ddpm.training.preemption): Ctrl-C, and SLURM's SIGTERM, reach every process of the group, and a worker
    they ended would fail the step in flight. Workers end with the main process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


@atexit.register  # after multiprocessing's own exit handler, so it runs first
def _kill_workers_left_at_exit() -> None:
    """At exit, multiprocessing ends the daemonic workers still alive with SIGTERM, which ours ignore, and then
    waits for them: a loader iterator still referenced when the interpreter exits would hang the process. The
    workers hold nothing to save, so they are killed (torch's SIGCHLD handler, which would report each killed
    worker as a failure, is set aside first)."""
    workers = [child for child in multiprocessing.active_children() if child.daemon]
    if workers:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for worker in workers:
        worker.kill()


class SeededBatches(Dataset):
    """`dataset.__getitems__((seed, indices))` loads one batch with torch's RNG seeded to `seed` (for random
    transforms such as flips), without disturbing the caller's RNG: the same batch gets the same augmentation
    in whichever worker, or in the main process, loads it."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, batch: tuple[int, list[int]]) -> list[Any]:
        seed, indices = batch
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return [self.dataset[index] for index in indices]


class EpochOrder(Sampler):
    """Endless full batches as (seed, indices), epoch after epoch, starting at (`epoch`, `batch`).

    Epoch e's permutation and batch seeds come from a generator seeded with (seed, e), so any batch of any
    epoch can be produced without replaying the ones before it. `rank`/`world_size` give each process its
    own share.
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        *,
        seed: int,
        epoch: int = 0,
        batch: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.epoch, self.batch = epoch, batch
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch = num_items // (batch_size * world_size)

    def epoch_plan(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.num_items, generator=generator)
        seeds = torch.randint(0, 2**62, (self.batches_per_epoch * self.world_size,), generator=generator)
        return order, seeds

    def __iter__(self) -> Iterator[tuple[int, list[int]]]:
        epoch, batch = self.epoch, self.batch
        while True:
            order, seeds = self.epoch_plan(epoch)
            for b in range(batch, self.batches_per_epoch):
                slot = b * self.world_size + self.rank  # the global batch index of this rank's share
                start = slot * self.batch_size
                yield int(seeds[slot]), order[start : start + self.batch_size].tolist()
            epoch, batch = epoch + 1, 0


class ResumableBatches:
    """The position (epoch, batch) in an endless stream of shuffled full batches, as EpochOrder lays them out.

    `state_dict()` is the position of the next batch the loop will take (not of what was prefetched); a new
    instance given that state continues exactly there. Subclasses turn each (seed, indices) into a batch.
    """

    def __init__(self, num_items: int, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1):
        if batch_size * world_size > num_items:
            raise ConfigError(
                f"trainer.batch_size={batch_size * world_size} is larger than the training set ({num_items} images)"
            )
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.batch = 0, 0
        self.batches_per_epoch = num_items // (batch_size * world_size)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch, "batch_size": self.batch_size, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        if self.batch >= self.batches_per_epoch:  # saved with another batch size: start the next epoch
            self.epoch, self.batch = self.epoch + 1, 0
        self.restart()

    def restart(self) -> None:
        """Drops whatever was prepared ahead: the next batch is the one at the current position."""

    def order(self) -> EpochOrder:
        """The (seed, indices) of every batch from the current position on."""
        return EpochOrder(
            self.num_items,
            self.batch_size,
            seed=self.seed,
            epoch=self.epoch,
            batch=self.batch,
            rank=self.rank,
            world_size=self.world_size,
        )

    def advance(self) -> None:
        """Counts one batch handed to the loop."""
        self.batch += 1
        if self.batch == self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0

    def __iter__(self) -> "ResumableBatches":
        return self


class TrainingBatches(ResumableBatches):
    """Batches of (images, labels) from a dataset, loaded by DataLoader workers (into pinned memory for a GPU)."""

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        seed: int,
        num_workers: int = 0,
        pin_memory: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ):
        super().__init__(len(dataset), batch_size, seed=seed, rank=rank, world_size=world_size)
        self.dataset, self.num_workers, self.pin_memory = dataset, num_workers, pin_memory
        self._iterator: Iterator | None = None

    def restart(self) -> None:
        self._iterator = None

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._iterator is None:
            loader = DataLoader(
                SeededBatches(self.dataset),
                batch_sampler=self.order(),
                num_workers=self.num_workers,
                pin_memory=self.pin_memory,
                # Worker seeds come from here, not from the global stream the training step draws from.
                generator=torch.Generator().manual_seed(self.seed),
                worker_init_fn=ignore_stop_signals,
            )
            self._iterator = iter(loader)
        batch = next(self._iterator)
        self.advance()
        return batch


def evaluation_batches(dataset: Dataset, batch_size: int, *, num_workers: int) -> DataLoader:
    """The test split in a fixed order, so the test loss is comparable from one log to the next."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(0),  # leaves the global stream alone at every pass
        worker_init_fn=ignore_stop_signals,
    )
