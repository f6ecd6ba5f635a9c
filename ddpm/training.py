"""The training loop and its settings (the `trainer` config group)."""

import dataclasses
import logging
import math
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ddpm.checkpoint import save_checkpoint
from ddpm.diffusion import GaussianDiffusion
from ddpm.errors import ConfigError
from ddpm.images import save_grid

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainSettings:
    """Settings of the loop; every rate counts optimizer steps and 0 turns it off."""

    iterations: int = 800_000
    batch_size: int = 256
    loss_type: str = "l2"  # read by the diffusion; listed here because it is a choice about training
    use_labels: bool = False  # class-conditional training; read by the model too
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    warmup: int = 0  # linear learning-rate warmup steps; 0 = off
    log_rate: int = 100
    test_batches: int = 10  # batches of the test split per test-loss estimate; 0 = the whole split
    sample_rate: int = 10_000
    checkpoint_rate: int = 10_000
    early_stop_loss_change: float = 0.0
    ema_decay: float = 0.9999
    ema_update_rate: int = 1
    ema_start: int = 1
    use_ema: bool = True
    device: str = "auto"
    seed: int = 0
    num_workers: int = 4
    grid_columns: int = 10  # sample grids: columns x columns images, or one row of this many per class
    sample_at_end: bool = True

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            expected = (int, float) if field.type is float else field.type
            if not isinstance(value, expected) or (field.type is not bool and isinstance(value, bool)):
                raise ConfigError(f"trainer.{field.name}={value!r} must be of type {field.type.__name__}")
        positive = ("iterations", "batch_size", "ema_update_rate", "grid_columns")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"trainer.{name}={getattr(self, name)} must be >= 1")
        non_negative = ("grad_clip", "warmup", "log_rate", "test_batches", "sample_rate", "checkpoint_rate",
                        "early_stop_loss_change", "ema_start", "num_workers")  # fmt: skip
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ConfigError(f"trainer.{name}={getattr(self, name)} must be >= 0 (0 turns it off)")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"trainer.ema_decay={self.ema_decay} must be in [0, 1)")
        if self.early_stop_loss_change > 0 and self.log_rate == 0:
            raise ConfigError("trainer.early_stop_loss_change > 0 compares logged losses: set trainer.log_rate > 0")


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when present, else CPU; anything else must name an available device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ConfigError(f"trainer.device={name!r} is not a device: use auto, cpu, cuda or cuda:N") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={name!r}, but CUDA is not available here: use auto or cpu")
    return device


def warmup_lr(step: int, base_lr: float, warmup: int) -> float:
    """Linear warmup to base_lr over `warmup` steps (step counts from 0), constant after."""
    return base_lr if warmup == 0 else base_lr * min(1.0, (step + 1) / warmup)


def should_stop_early(interval_losses: list[float], threshold: float, window: int = 10) -> bool:
    """The seed's rule: after more than `window` log intervals, stop when the mean absolute change between
    consecutive interval-averaged train losses over the last `window` intervals is below `threshold`."""
    if threshold <= 0 or len(interval_losses) <= window:
        return False
    recent = interval_losses[-(window + 1) :]
    changes = [abs(b - a) for a, b in zip(recent, recent[1:])]
    return sum(changes) / len(changes) < threshold


@torch.no_grad()
def estimate_test_loss(
    diffusion: GaussianDiffusion, loader: DataLoader, *, device: torch.device, use_labels: bool, max_batches: int
) -> float:
    """Mean loss on the test split, with timesteps and noise from a fixed seed: a function of the weights alone."""
    generator = torch.Generator(device).manual_seed(0)
    was_training = diffusion.training
    diffusion.eval()
    total, count = torch.zeros((), device=device), 0
    for index, (x, y) in enumerate(loader):
        if max_batches and index >= max_batches:
            break
        x = x.to(device, non_blocking=True)
        labels = y.to(device, non_blocking=True) if use_labels else None
        total += diffusion.losses(x, labels, generator=generator).sum()
        count += x.shape[0]
    diffusion.train(was_training)
    return total.item() / max(count, 1)


def sample_grid(
    diffusion: GaussianDiffusion, *, device: torch.device, columns: int, num_classes: int | None, seed: int = 0
) -> torch.Tensor:
    """Images for a grid: one row per class when conditional, else columns x columns; the same noise each time."""
    if num_classes is not None:
        labels = torch.arange(num_classes, device=device).repeat_interleave(columns)
    else:
        labels = None
    count = columns * (num_classes or columns)
    generator = torch.Generator(device).manual_seed(seed)
    return diffusion.sample(count, device, labels, generator=generator, progress=sys.stderr.isatty())


def train(
    diffusion: GaussianDiffusion,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    settings: TrainSettings,
    *,
    device: torch.device,
    run_dir: Path,
    logger: Any,
    config: dict[str, Any],
    test_loader: DataLoader | None = None,
) -> dict[str, Any]:
    """Runs settings.iterations optimizer steps (or until early stopping) and returns a summary."""
    model = diffusion.model
    num_classes = model.num_classes if settings.use_labels else None
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    checkpoint_dir = run_dir / "checkpoints"

    def is_periodic(step: int) -> bool:
        return settings.checkpoint_rate > 0 and step % settings.checkpoint_rate == 0

    def checkpoint(step: int) -> None:
        state = {
            "model": model.state_dict(),
            "ema": diffusion.ema.state_dict() if diffusion.ema is not None else None,
            "optimizer": optimizer.state_dict(),
            "step": step,
            "config": config,
        }
        save_checkpoint(checkpoint_dir / "last.pt", state)
        if is_periodic(step):
            save_checkpoint(checkpoint_dir / f"step_{step:07d}.pt", state)

    def grid(step: int, name: str) -> Path:
        images = sample_grid(diffusion, device=device, columns=settings.grid_columns, num_classes=num_classes)
        path = save_grid(images, run_dir / "samples" / name, columns=settings.grid_columns)
        logger.log_image("samples", path, step, caption=f"step {step}")
        return path

    interval_losses: list[float] = []
    metrics: dict[str, float] = {}
    running_loss, running_count = torch.zeros((), device=device), 0
    grid_path, stopped_early = None, False
    started = interval_start = time.perf_counter()
    model.train()
    bar = tqdm(total=settings.iterations, desc="training", disable=not sys.stderr.isatty(), dynamic_ncols=True)
    step = 0
    while step < settings.iterations:
        for group, base_lr in zip(optimizer.param_groups, base_lrs):
            group["lr"] = warmup_lr(step, base_lr, settings.warmup)
        x, y = next(batches)
        x = x.to(device, non_blocking=True)
        labels = y.to(device, non_blocking=True) if settings.use_labels else None

        loss = diffusion(x, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if settings.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        diffusion.update_ema()
        step += 1
        bar.update()

        # Accumulated on the device; read (one host sync) only when logging.
        running_loss += loss.detach()
        running_count += 1
        if settings.log_rate and step % settings.log_rate == 0:
            elapsed = time.perf_counter() - interval_start
            metrics = {
                "train_loss": running_loss.item() / running_count,
                "lr": optimizer.param_groups[0]["lr"],
                "images_per_s": running_count * x.shape[0] / elapsed,
            }
            if test_loader is not None:
                metrics["test_loss"] = estimate_test_loss(
                    diffusion, test_loader, device=device, use_labels=settings.use_labels,
                    max_batches=settings.test_batches,
                )  # fmt: skip
            if not math.isfinite(metrics["train_loss"]):
                raise FloatingPointError(f"the train loss is {metrics['train_loss']} at step {step}")
            logger.log(metrics, step)
            log.info("step %d/%d  %s", step, settings.iterations, "  ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
            bar.set_postfix(loss=f"{metrics['train_loss']:.4f}")
            interval_losses.append(metrics["train_loss"])
            running_loss.zero_()
            running_count = 0
            interval_start = time.perf_counter()
            if should_stop_early(interval_losses, settings.early_stop_loss_change):
                log.info("early stop at step %d: the train loss changed by less than %g per interval",
                         step, settings.early_stop_loss_change)  # fmt: skip
                stopped_early = True
        if is_periodic(step):
            checkpoint(step)
        if settings.sample_rate and step % settings.sample_rate == 0:
            grid_path = grid(step, f"step_{step:07d}.png")
        if stopped_early:
            break
    bar.close()

    if not is_periodic(step):  # else the loop has just written this step's checkpoint
        checkpoint(step)
    if settings.sample_at_end:
        if settings.sample_rate and step % settings.sample_rate == 0:  # this step's grid exists: no resampling
            grid_path = Path(shutil.copyfile(grid_path, run_dir / "samples" / "final.png"))
        else:
            grid_path = grid(step, "final.png")
    return {
        "steps": step,
        "train_loss": metrics.get("train_loss"),
        "test_loss": metrics.get("test_loss"),
        "stopped_early": stopped_early,
        "wall_time_s": time.perf_counter() - started,
        "sample_grid": str(grid_path) if grid_path else None,
        "checkpoint": str(checkpoint_dir / "last.pt"),
    }
