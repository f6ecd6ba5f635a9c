"""The training loop's parts, built from the components the config describes: the data-parallel wrapper, the
update step, the global-batch noise stream, the checkpointer (restoring a checkpoint into everything), the
non-finite policy, sample grids, the test loss and the agreement on stopping. ddpm.training.loop loops over them."""

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from ddpm.data.device import DeviceBatches
from ddpm.data.loader import TrainingBatches
from ddpm.diffusion.gaussian import GaussianDiffusion
from ddpm.diffusion.samplers import ddpm_ancestral
from ddpm.io.loggers import NullLogger
from ddpm.runtime.distributed import Ranks, data_parallel
from ddpm.runtime.fast_paths import FastPaths, memory_format
from ddpm.training.checkpointer import Checkpointer, Saved
from ddpm.training.grids import SampleGrids
from ddpm.training.held_out_loss import HeldOutLoss
from ddpm.training.loop_state import LoopState
from ddpm.training.noise_stream import GlobalBatchNoise
from ddpm.training.nonfinite import NonFinitePolicy
from ddpm.training.preemption import StopAgreement, StopSignal
from ddpm.training.settings import TrainSettings
from ddpm.training.update import UpdateStep


@dataclasses.dataclass
class TrainingParts:
    """Everything the loop uses, built. A context manager: the stop signal is caught while it is open."""

    diffusion: GaussianDiffusion
    batches: TrainingBatches | DeviceBatches
    noise: GlobalBatchNoise
    update: UpdateStep
    loop: LoopState
    nonfinite: NonFinitePolicy
    checkpoints: Checkpointer
    logger: Any  # a NullLogger on ranks above 0
    held_out: HeldOutLoss | None  # the test loss (rank 0, when there is a test split)
    grids: SampleGrids | None  # rank 0
    evaluator: Callable[[GaussianDiffusion], float] | None  # a FID of the weights (rank 0, trainer.eval_rate)
    stop_signal: StopSignal
    stop: StopAgreement
    ranks: Ranks
    device: torch.device
    resumed_from_step: int | None

    def __enter__(self) -> "TrainingParts":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop.close()
        self.stop_signal.close()


def build_training(
    diffusion: GaussianDiffusion,
    optimizer: torch.optim.Optimizer,
    batches: TrainingBatches | DeviceBatches,
    settings: TrainSettings,
    *,
    fast: FastPaths,
    device: torch.device,
    run_dir: Path,
    config: dict[str, Any],
    logger: Any = None,
    ranks: Ranks = Ranks(),
    resume: tuple[Path, dict[str, Any]] | None = None,
    test_loader: DataLoader | None = None,
    sampler: Callable[..., torch.Tensor] = ddpm_ancestral,
    guidance_scale: float = 0.0,
    evaluator: Callable[[GaussianDiffusion], float] | None = None,
    run_id: str | None = None,
) -> TrainingParts:
    """The loop's parts around a built diffusion (prepared for `fast`), its optimizer and its batches. With
    `resume` (the path and contents of a checkpoint this loop wrote) everything continues where it stopped, bit
    for bit. Rank 0 alone logs (`logger`), tests, samples and evaluates; every checkpoint carries `run_id`."""
    if settings.eval_rate and ranks.is_main and evaluator is None:
        raise ValueError("trainer.eval_rate > 0 needs an evaluator (a function of the diffusion giving a FID)")
    logger = logger if ranks.is_main and logger is not None else NullLogger()
    update = UpdateStep(
        data_parallel(diffusion, device, ranks),
        optimizer,
        diffusion.update_ema,
        fast=fast,
        device=device,
        max_grad_norm=settings.max_grad_norm,
    )
    noise = GlobalBatchNoise(
        diffusion,
        seed=settings.seed,
        local_batch=batches.batch_size,
        ranks=ranks,
        device=device,
        label_dropout=settings.label_dropout,
        layout=memory_format(fast),
    )
    loop, nonfinite = LoopState().to(device), NonFinitePolicy(settings.skip_nonfinite, device)
    saved = Saved(diffusion, optimizer, batches, noise, loop, nonfinite, logger, update.scaler)
    checkpoints = Checkpointer(
        run_dir / "checkpoints",
        saved,
        rate=settings.checkpoint_rate,
        keep=settings.keep_checkpoints,
        config=config,
        ranks=ranks,
        run_id=run_id,
    )
    if resume:
        checkpoints.restore(*resume)
    num_classes = diffusion.model.num_classes if settings.use_labels else None
    grids = SampleGrids(
        diffusion,
        sampler,
        guidance_scale=guidance_scale,
        columns=settings.grid_columns,
        num_classes=num_classes,
        directory=run_dir / "samples",
        logger=logger,
        device=device,
    )
    held_out = (
        HeldOutLoss(test_loader, device=device, use_labels=settings.use_labels, max_batches=settings.test_batches)
        if test_loader is not None and ranks.is_main
        else None
    )
    stop_signal = StopSignal()
    parts = TrainingParts(
        diffusion,
        batches,
        noise,
        update,
        loop,
        nonfinite,
        checkpoints,
        logger,
        held_out=held_out,
        grids=grids if ranks.is_main else None,
        evaluator=evaluator if ranks.is_main else None,
        stop_signal=stop_signal,
        stop=StopAgreement(stop_signal, ranks),
        ranks=ranks,
        device=device,
        resumed_from_step=resume[1]["step"] if resume else None,
    )
    if resume:
        checkpoints.restore_random_streams(resume[1])  # last: building drew from the streams too
    return parts
