"""A training run's checkpoints: what one holds (both ways: saving and restoring), which steps are saved,
pruning the periodic ones, and best.pt. The file format itself is ddpm.io.checkpoint's."""

import dataclasses
import errno
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from ddpm.config.errors import CheckpointError, StorageError
from ddpm.data.device import DeviceBatches
from ddpm.data.loader import TrainingBatches
from ddpm.diffusion.gaussian import GaussianDiffusion
from ddpm.io.checkpoint import copy_checkpoint, periodic_name, prune_periodic, save_checkpoint
from ddpm.runtime.distributed import Ranks, gather_to_main, sum_across_ranks
from ddpm.runtime.preflight import MB, estimated_checkpoint_bytes
from ddpm.runtime.rng import capture_rng_state, restore_rng_state
from ddpm.training.loop_state import LoopState
from ddpm.training.noise_stream import GlobalBatchNoise
from ddpm.training.nonfinite import NonFinitePolicy
from ddpm.training.optimizer import match_parameter_layouts, with_configured_settings

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Saved:
    """Everything with state that a checkpoint holds, besides the step and the config."""

    diffusion: GaussianDiffusion  # the network and its EMA copy
    optimizer: torch.optim.Optimizer
    batches: TrainingBatches | DeviceBatches  # the data position
    noise: GlobalBatchNoise
    loop: LoopState
    nonfinite: NonFinitePolicy
    logger: Any  # e.g. the wandb run id
    scaler: torch.amp.GradScaler | None = None  # fp16's loss scale and its growth count


class Checkpointer:
    """Writes `<directory>/last.pt` (and `step_N.pt` every `rate` steps, the newest `keep` of them kept) and
    remembers which step is on disk, so that no step is written twice. Every rank takes part in a save (random
    streams and running sums are gathered); rank 0 writes."""

    def __init__(
        self,
        directory: Path,
        saved: Saved,
        *,
        rate: int,
        keep: int,
        config: dict[str, Any],
        ranks: Ranks,
        run_id: str | None = None,
    ):
        self.directory, self.saved, self.rate, self.keep = directory, saved, rate, keep
        self.config, self.ranks, self.run_id = config, ranks, run_id  # run_id: the run every checkpoint belongs to
        self.last = directory / "last.pt"
        self.saved_step: int | None = None  # the step last.pt holds, when this run wrote or resumed from it
        self.saved_path: Path | None = None

    def is_periodic(self, step: int) -> bool:
        return self.rate > 0 and step % self.rate == 0

    def describe_last(self) -> str:
        """Where the last intact checkpoint is, for error messages."""
        if self.saved_step is None:
            return "no checkpoint has been written yet"
        return f"the last intact checkpoint is {self.saved_path} (step {self.saved_step})"

    def save(self, step: int, wall_time_s: float) -> None:
        """Writes this step's checkpoint, unless it is on disk already."""
        if self.saved_step == step and self.saved_path == self.last:
            return
        saved = self.saved
        per_rank_rng = gather_to_main(capture_rng_state(), self.ranks)
        sum_across_ranks(saved.loop.loss_sum, self.ranks)
        if not self.ranks.is_main:
            saved.loop.loss_sum.zero_()  # rank 0 holds the total now
            self.saved_step, self.saved_path = step, self.last
            return
        ema = saved.diffusion.ema
        state = {
            "model": saved.diffusion.model.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "optimizer": saved.optimizer.state_dict(),
            "step": step,
            "run_id": self.run_id,
            "config": self.config,
            "loop": {**saved.loop.state_dict(), **saved.nonfinite.state_dict(), "wall_time_s": wall_time_s},
            "data": saved.batches.state_dict(),
            "rng": {"noise": saved.noise.get_state(), "ranks": per_rank_rng},
            "logger": saved.logger.state_dict(),
            "scaler": saved.scaler.state_dict() if saved.scaler is not None and saved.scaler.is_enabled() else None,
        }
        periodic = (self.directory / periodic_name(step),) if self.is_periodic(step) else ()
        try:
            save_checkpoint(self.last, state, also=periodic)
        except (OSError, RuntimeError) as error:  # torch.save reports a full disk as a RuntimeError
            raise self.write_failure(error) from error
        self.saved_step, self.saved_path = step, self.last
        for path in prune_periodic(self.directory, self.keep):
            log.info("removed %s (trainer.keep_checkpoints=%d)", path.name, self.keep)

    def write_failure(self, error: Exception) -> Exception:
        """A StorageError for a failed checkpoint write when the disk is full (or read-only), naming the directory,
        the free space, a checkpoint's size and the last intact checkpoint; other errors as they are."""
        size = (
            self.last.stat().st_size
            if self.last.is_file()
            else estimated_checkpoint_bytes(self.saved.diffusion.model, self.saved.diffusion.ema is not None)
        )
        free = shutil.disk_usage(self.directory).free
        full = getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or free < 2 * size
        if not full and getattr(error, "errno", None) != errno.EROFS:
            return error
        reason = "the disk is full" if full else "the file system has become read-only"
        return StorageError(
            f"writing a checkpoint to {self.directory} failed: {reason} ({free / MB:.0f} MB free, a checkpoint "
            f"takes about {size / MB:.0f} MB); {self.describe_last()}. Free space and run the same command to continue"
        )

    def keep_as_best(self) -> None:
        """best.pt becomes the checkpoint last.pt holds (rank 0)."""
        if self.ranks.is_main:
            copy_checkpoint(self.last, self.directory / "best.pt")

    def restore(self, path: Path, state: dict[str, Any]) -> None:
        """Puts weights, EMA, optimizer, data position and loop state back from `state` (read from `path`), on
        every rank. The random streams are the wiring's last step: see restore_random_streams."""
        saved = self.saved
        try:
            saved.diffusion.model.load_state_dict(state["model"])
            if saved.diffusion.ema is not None and state.get("ema") is not None:
                saved.diffusion.ema.load_state_dict(state["ema"])
            saved.optimizer.load_state_dict(with_configured_settings(state["optimizer"], saved.optimizer))
            match_parameter_layouts(saved.optimizer)
        except (RuntimeError, ValueError, KeyError, TypeError) as error:
            reason = next(iter(str(error).splitlines()), type(error).__name__)
            raise CheckpointError(
                f"trainer.resume={path}: its weights are not those of the model its config describes ({reason})"
            ) from error
        if saved.scaler is not None and saved.scaler.is_enabled() and state.get("scaler"):
            saved.scaler.load_state_dict(state["scaler"])  # else the scale starts afresh, as in a new fp16 run
        saved.batches.load_state_dict(state["data"])
        saved.loop.load_state_dict(state["loop"])
        if not self.ranks.is_main:  # the saved running sums are the total over all ranks, kept by rank 0
            saved.loop.loss_sum.zero_()
        saved.nonfinite.load_state_dict(state["loop"])
        self.saved_step, self.saved_path = state["step"], Path(path)

    def restore_random_streams(self, state: dict[str, Any]) -> None:
        """The noise stream and this rank's torch/NumPy/Python streams; last, since building drew from them."""
        rng = state["rng"]
        self.saved.noise.set_state(rng["noise"], step=state["step"])
        if len(rng["ranks"]) == self.ranks.world_size:
            restore_rng_state(rng["ranks"][self.ranks.rank])
        else:
            log.warning(
                "the checkpoint was written by %d ranks and this run has %d: dropout draws start afresh",
                len(rng["ranks"]),
                self.ranks.world_size,
            )
