"""The training loop: one step in execution order, over parts built by ddpm.training.setup.

with build_training(diffusion, optimizer, batches, settings, ...) as parts:
    summary = train(parts, settings)
"""

import logging
import math
import socket
import sys
import time
from itertools import pairwise
from typing import Any

from tqdm.auto import tqdm

from ddpm.io.checkpoint import content_digest
from ddpm.runtime.distributed import any_rank, barrier, gather_to_main, share_running_statistics
from ddpm.training.settings import TrainSettings
from ddpm.training.setup import TrainingParts
from ddpm.training.update import StepResult

log = logging.getLogger(__name__)


def learning_rate(step: int, base_lr: float, warmup: int, decay: str = "constant", iterations: int = 0) -> float:
    """Linear warmup to base_lr over `warmup` steps (step counts from 0); then constant (the DDPM paper's), or
    decayed towards 0 at `iterations` along a half cosine or a line. A function of the step alone, so a resumed
    run continues the same curve."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if decay == "constant" or iterations <= warmup:
        return base_lr
    progress = min((step - warmup) / (iterations - warmup), 1.0)
    return base_lr * (0.5 * (1 + math.cos(math.pi * progress)) if decay == "cosine" else 1 - progress)


def should_stop_early(interval_losses: list[float], threshold: float, window: int = 10) -> bool:
    """The seed's rule: after more than `window` log intervals, stop when the mean absolute change between
    consecutive interval-averaged train losses over the last `window` intervals is below `threshold`."""
    if threshold <= 0 or len(interval_losses) <= window:
        return False
    recent = interval_losses[-(window + 1) :]
    changes = [abs(b - a) for a, b in pairwise(recent)]
    return sum(changes) / len(changes) < threshold


def train(parts: TrainingParts, settings: TrainSettings) -> dict[str, Any]:
    """Runs optimizer steps up to settings.iterations (or an early stop, or a stop signal) and returns a summary.

    Nothing here waits for the device except at logs, evaluations and checkpoints (and a for-loop optimizer's
    own check of each step). With several ranks each trains on its share of every global batch and all take the
    same branches; rank 0 alone logs, samples and writes.
    """
    loop, ranks, optimizer = parts.loop, parts.ranks, parts.update.optimizer
    base_lrs = [group["lr"] for group in optimizer.param_groups]  # from the config, also when resuming
    started = interval_start = time.perf_counter()
    interval_steps, metrics = 0, {}
    bar = tqdm(
        total=settings.iterations,
        initial=loop.step,
        desc="training",
        dynamic_ncols=True,
        disable=not (sys.stderr.isatty() and ranks.is_main),
    )
    parts.diffusion.train()
    while loop.step < settings.iterations and not loop.stopped_early:
        take_step(parts, settings, base_lrs)
        interval_steps += 1
        bar.update()

        # Log the interval's means, the test loss; early stopping on the train loss.
        if settings.log_rate and loop.step % settings.log_rate == 0:
            seconds = time.perf_counter() - interval_start
            metrics = log_interval(parts, settings, images=interval_steps * parts.noise.global_batch, seconds=seconds)
            bar.set_postfix(loss=f"{metrics.get('train_loss', math.nan):.4f}")
            interval_steps, interval_start = 0, time.perf_counter()

        # Evaluate: a cheap FID of the EMA weights; the best is kept as best.pt and may end the run.
        if settings.eval_rate and loop.step % settings.eval_rate == 0:
            measure_fid(parts, settings, started)

        # Checkpoint; stop at this step boundary when the cluster asks (every rank agrees on the step).
        stopping = parts.stop()
        if parts.checkpoints.is_periodic(loop.step) or stopping:
            checkpoint(parts, started)
        if stopping:
            barrier(ranks)  # the checkpoint is on disk before anyone requeues
            # A requeue ends every process of the job at once, wandb's service too: the log is closed first.
            parts.logger.finish()
            parts.stop_signal.hand_over(loop.step, parts.checkpoints.last)

        # A sample grid.
        if parts.grids is not None and settings.sample_rate and loop.step % settings.sample_rate == 0:
            parts.grids.draw(loop.step)
    bar.close()
    return finish(parts, settings, metrics, started)


def take_step(parts: TrainingParts, settings: TrainSettings, base_lrs: list[float]) -> StepResult:
    """One optimizer step, in execution order; nothing here waits for the device (but a for-loop optimizer's own
    check of the step)."""
    loop, optimizer = parts.loop, parts.update.optimizer
    # Learning rate, then the batch and its noise (drawn for the global batch: this rank takes its share).
    for group, base_lr in zip(optimizer.param_groups, base_lrs, strict=True):
        group["lr"] = learning_rate(loop.step, base_lr, settings.warmup, settings.lr_decay, settings.iterations)
    x, y = next(parts.batches)
    x = x.to(parts.device, non_blocking=True, memory_format=parts.noise.layout)
    t, noise, labels = parts.noise.draw(y.to(parts.device, non_blocking=True) if settings.use_labels else None)

    # Forward, backward, an update that a non-finite loss or gradient never reaches, the EMA.
    result = parts.update(x, labels, t, noise)
    loop.step += 1
    loop.add_step(result)
    parts.nonfinite.record(result, loop.step)
    if not parts.update.skips_on_device:  # this step synchronized already: report a fault at once
        parts.nonfinite.check(parts.checkpoints.describe_last())
    return result


def checkpoint(parts: TrainingParts, started: float) -> None:
    """This step's checkpoint (every rank takes part), never past a non-finite step not reported yet."""
    parts.nonfinite.check(parts.checkpoints.describe_last())
    parts.checkpoints.save(parts.loop.step, parts.loop.total_time(started))
    parts.logger.plot()  # metrics.png, refreshed with every checkpoint (a no-op on ranks above 0)


def log_interval(parts: TrainingParts, settings: TrainSettings, *, images: int, seconds: float) -> dict[str, float]:
    """The metrics since the last log (every rank computes the same ones; rank 0 logs them)."""
    loop = parts.loop
    parts.nonfinite.check(parts.checkpoints.describe_last())
    metrics = loop.close_interval(parts.ranks)
    metrics["lr"] = parts.update.optimizer.param_groups[0]["lr"]
    metrics["images_per_s"] = images / max(seconds, 1e-9)
    if settings.skip_nonfinite:
        metrics["skipped_nonfinite"] = parts.nonfinite.reported
    if parts.held_out is not None:
        metrics["test_loss"] = parts.held_out(parts.diffusion)
    parts.logger.log(metrics, loop.step)
    if parts.ranks.is_main:
        log.info(
            "step %d/%d  %s", loop.step, settings.iterations, "  ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        )
    if settings.early_stop_metric == "train_loss" and should_stop_early(
        loop.interval_losses, settings.early_stop_loss_change
    ):
        log.info(
            "early stop at step %d: the train loss changed by less than %g per interval",
            loop.step,
            settings.early_stop_loss_change,
        )
        loop.stopped_early = True
    return metrics


def measure_fid(parts: TrainingParts, settings: TrainSettings, started: float) -> None:
    """A FID on rank 0; a new best is saved as best.pt. Every rank learns whether to stop."""
    loop, ranks = parts.loop, parts.ranks
    improved = False
    if ranks.is_main:
        fid = parts.evaluator(parts.diffusion)
        improved = loop.record_fid(fid)
        parts.logger.log({"fid": fid, "best_fid": loop.best_fid}, loop.step)
        log.info("step %d  fid %.4g  (best %.4g; %s)", loop.step, fid, loop.best_fid, parts.evaluator.description)
    if any_rank(improved, ranks, parts.device):
        checkpoint(parts, started)  # this step's, before best.pt becomes a copy of it
        parts.checkpoints.keep_as_best()
    patience_spent = loop.evals_since_best >= settings.early_stop_patience
    if any_rank(settings.early_stop_metric == "fid" and patience_spent, ranks, parts.device):
        log.info("early stop at step %d: no better FID in %d evaluations", loop.step, settings.early_stop_patience)
        loop.stopped_early = True


def finish(parts: TrainingParts, settings: TrainSettings, metrics: dict[str, float], started: float) -> dict[str, Any]:
    """The last checkpoint, a check that the ranks agree, the final grid, and the run's summary."""
    loop, ranks, checkpoints = parts.loop, parts.ranks, parts.checkpoints
    checkpoint(parts, started)  # a no-op when this step's last.pt is on disk already
    # Data parallelism keeps the replicas equal; say so, from a digest of each rank's weights (and where each
    # rank ran: ranks of a job that spans nodes are on different hosts).
    share_running_statistics(parts.diffusion, ranks)  # the network's and its EMA's
    digest = content_digest({"model": parts.diffusion.model.state_dict()})
    gathered = gather_to_main((digest, socket.gethostname()), ranks)  # None on ranks above 0
    weight_digests = [rank_digest for rank_digest, _ in gathered] if gathered else None
    hosts = [host for _, host in gathered] if gathered else None
    if ranks.is_main and len(set(weight_digests)) > 1:
        log.warning("the ranks ended with different weights: %s", weight_digests)
    grid = None  # the final grid, else the newest periodic one
    if parts.grids is not None and settings.sample_at_end:
        # After the last checkpoint and before summary.json: a run stopped here is not finished, and the same
        # command draws the grid (resuming at the last step, which trains nothing).
        with parts.stop_signal.at_once(
            f"during the final grid: stopping now; the checkpoint of step {loop.step} is written, and running the "
            "same command draws the grid and writes the summary"
        ):
            grid = parts.grids.final(loop.step)
    elif parts.grids is not None and parts.grids.latest is not None:
        grid = parts.grids.latest[1]
    best = math.isfinite(loop.best_fid)
    return {
        "steps": loop.step,
        "train_loss": metrics.get("train_loss"),
        "test_loss": metrics.get("test_loss"),
        "stopped_early": loop.stopped_early,
        "skipped_nonfinite": parts.nonfinite.reported,
        "resumed_from_step": parts.resumed_from_step,
        "wall_time_s": loop.total_time(started),
        "sample_grid": str(grid) if grid else None,
        "checkpoint": str(checkpoints.last),
        "world_size": ranks.world_size,
        "rank_weight_digests": weight_digests,
        "rank_hosts": hosts,
        "best_fid": loop.best_fid if best else None,
        "best_checkpoint": str(checkpoints.directory / "best.pt") if best else None,
    }
