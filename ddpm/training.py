"""The training loop and its settings (the `trainer` config group)."""

import dataclasses
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ddpm.checkpoint import content_digest, copy_checkpoint, periodic_name, prune_periodic, save_checkpoint
from ddpm.checks import describe, matches
from ddpm.data.loader import TrainingBatches
from ddpm.diffusion import GaussianDiffusion
from ddpm.errors import ConfigError, NonFiniteError
from ddpm.images import save_grid
from ddpm.distributed import Ranks, any_rank, barrier, gather_to_main, sum_across_ranks
from ddpm.fast_paths import (
    FastPaths, autocast, grad_scaler, memory_format, optimizer_skips_on_device, resolve_fast_paths,
    step_unless_nonfinite,
)  # fmt: skip
from ddpm.preemption import StopSignal
from ddpm.rng import capture_rng_state, restore_rng_state
from ddpm.samplers import ddpm_ancestral

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
    label_dropout: float = 0.0  # classifier-free guidance: the share of labels replaced by the null label
    eval_rate: int = 0  # steps between cheap FIDs of the EMA weights (keeps best.pt); 0 = off
    eval_samples: int = 5000  # images per cheap FID
    eval_steps: int = 50  # DDIM steps per image of a cheap FID
    early_stop_metric: str = "train_loss"  # train_loss (early_stop_loss_change) | fid (early_stop_patience)
    early_stop_patience: int = 5  # with early_stop_metric=fid: evaluations without a new best FID before stopping
    resume: str = "auto"  # auto (continue from <run dir>/checkpoints when there is one) | never | PATH
    keep_checkpoints: int = 5  # periodic checkpoints kept besides last.pt; 0 = all
    skip_nonfinite: int = 0  # steps with a non-finite loss or gradient norm that may be skipped before stopping
    deterministic: bool = False  # deterministic kernels only (exact resume on GPU; slower)
    precision: str = "auto"  # auto (bf16 on GPUs that have it, else fp32) | fp32 | bf16 | fp16 (with a grad scaler)
    channels_last: bool | None = None  # NHWC layout; None = on CUDA
    compile: bool | None = None  # torch.compile the network; None = on CUDA
    data_on_device: bool | None = None  # the training split as one tensor on the device; None = on CUDA

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not matches(value, field.type):
                raise ConfigError(f"trainer.{field.name}={value!r} must be of type {describe(field.type)}")
        positive = ("iterations", "batch_size", "ema_update_rate", "grid_columns", "eval_samples", "eval_steps",
                "early_stop_patience")  # fmt: skip
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"trainer.{name}={getattr(self, name)} must be >= 1")
        non_negative = ("grad_clip", "warmup", "log_rate", "test_batches", "sample_rate", "checkpoint_rate",
                        "early_stop_loss_change", "ema_start", "num_workers", "keep_checkpoints", "skip_nonfinite", "eval_rate")  # fmt: skip
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ConfigError(f"trainer.{name}={getattr(self, name)} must be >= 0 (0 turns it off)")
        if self.early_stop_metric not in ("train_loss", "fid"):
            raise ConfigError(f"trainer.early_stop_metric={self.early_stop_metric!r} is not one of ['train_loss', 'fid']")
        if self.early_stop_metric == "fid" and self.eval_rate == 0:
            raise ConfigError("trainer.early_stop_metric=fid compares FIDs: set trainer.eval_rate > 0")
        if not 0 <= self.label_dropout < 1:
            raise ConfigError(f"trainer.label_dropout={self.label_dropout} must be in [0, 1)")
        if self.label_dropout > 0 and not self.use_labels:
            raise ConfigError(f"trainer.label_dropout={self.label_dropout} drops class labels: it needs trainer.use_labels=true")
        if self.loss_type not in ("l1", "l2"):
            raise ConfigError(f"trainer.loss_type={self.loss_type!r} is not one of ['l1', 'l2']")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"trainer.ema_decay={self.ema_decay} must be in [0, 1)")
        if not self.resume.strip():
            raise ConfigError("trainer.resume='' must be auto, never or the path of a checkpoint")
        if self.early_stop_loss_change > 0 and self.log_rate == 0:
            raise ConfigError("trainer.early_stop_loss_change > 0 compares logged losses: set trainer.log_rate > 0")

    @property
    def max_grad_norm(self) -> float:
        """The clipping threshold; inf (measure the norm, never clip) when grad_clip is 0."""
        return self.grad_clip if self.grad_clip > 0 else math.inf

    def fast_paths(self, device: torch.device) -> FastPaths:
        """The speed switches resolved for `device` (auto/null -> that device's default)."""
        return resolve_fast_paths(device=device, precision=self.precision, channels_last=self.channels_last,
                                  compile=self.compile, data_on_device=self.data_on_device)  # fmt: skip


def resolve_device(name: str, key: str = "trainer.device") -> torch.device:
    """'auto' -> CUDA when present, else CPU; anything else must name an available device. `key` is the
    config key that holds `name`, for the error messages."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ConfigError(f"{key}={name!r} is not a device: use auto, cpu, cuda or cuda:N") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}={name!r}, but CUDA is not available here: use auto or cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"{key}={name!r}, but only {torch.cuda.device_count()} GPU(s) are visible here")
    return device


def use_deterministic_kernels(enabled: bool) -> None:
    """Deterministic kernels only: on GPU this is what makes a resumed run bit-identical to an uninterrupted
    one (cuBLAS needs its workspace setting before CUDA starts). CPU kernels are deterministic already."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.benchmark = not enabled and torch.backends.cudnn.benchmark


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
    diffusion: GaussianDiffusion, *, device: torch.device, columns: int, num_classes: int | None, seed: int = 0,
    sampler: Callable[..., torch.Tensor] = ddpm_ancestral, guidance_scale: float = 0.0,
) -> torch.Tensor:  # fmt: skip
    """Images for a grid: one row per class when conditional, else columns x columns; the same noise each time."""
    if num_classes is not None:
        labels = torch.arange(num_classes, device=device).repeat_interleave(columns)
    else:
        labels = None
    count = columns * (num_classes or columns)
    generator = torch.Generator(device).manual_seed(seed)
    return diffusion.sample(count, device, labels, generator=generator, progress=sys.stderr.isatty(),
                            sampler=sampler, guidance_scale=guidance_scale)  # fmt: skip


@dataclasses.dataclass
class LoopState:
    """What the loop carries from one step to the next besides weights, optimizer and data position.

    All of it is saved in every checkpoint, so that a resumed run logs exactly what an uninterrupted one would.
    """

    step: int = 0
    skipped_nonfinite: int = 0
    loss_sum: torch.Tensor = dataclasses.field(default_factory=lambda: torch.zeros(()))  # since the last log
    grad_norm_sum: torch.Tensor = dataclasses.field(default_factory=lambda: torch.zeros(()))
    good_steps: torch.Tensor = dataclasses.field(default_factory=lambda: torch.zeros((), dtype=torch.long))
    # Non-finite steps decided on the device (no host sync per step): how many so far, and the latest one.
    faults: torch.Tensor = dataclasses.field(default_factory=lambda: torch.zeros((), dtype=torch.long))
    last_fault_step: torch.Tensor = dataclasses.field(default_factory=lambda: torch.zeros((), dtype=torch.long))
    interval_losses: list[float] = dataclasses.field(default_factory=list)  # one per log, for early stopping
    stopped_early: bool = False
    wall_time_s: float = 0.0  # training time of earlier processes of this run
    best_fid: float = math.inf  # trainer.eval_rate: the lowest FID so far (its checkpoint is best.pt)
    evals_since_best: int = 0

    TENSORS = ("loss_sum", "grad_norm_sum", "good_steps", "faults", "last_fault_step")

    def to(self, device: torch.device) -> "LoopState":
        for name in self.TENSORS:
            setattr(self, name, getattr(self, name).to(device))
        return self

    def state_dict(self) -> dict[str, Any]:
        state = dataclasses.asdict(self)
        state.update({name: getattr(self, name).cpu() for name in self.TENSORS})
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "LoopState":
        fields = {field.name: state[field.name] for field in dataclasses.fields(cls) if field.name in state}
        fields.update({name: torch.as_tensor(fields[name]) for name in cls.TENSORS if name in fields})
        return cls(**fields)

    def add_step(self, loss: torch.Tensor, grad_norm: torch.Tensor, counted: torch.Tensor, fault: torch.Tensor) -> None:
        """Accumulates one step on the device: its loss and norm when `counted`, a fault when `fault`."""
        self.loss_sum += torch.where(counted, loss, 0.0)
        self.grad_norm_sum += torch.where(counted, grad_norm, 0.0)
        self.good_steps += counted
        self.faults += fault
        self.last_fault_step.copy_(torch.where(fault, self.step, self.last_fault_step))


def forward_backward(
    step_module: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, x: torch.Tensor,
    labels: torch.Tensor | None, t: torch.Tensor, noise: torch.Tensor, *, fast: FastPaths, device: torch.device,
    max_norm: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Loss (under the chosen autocast) -> gradients -> clipped to `max_norm`: the detached loss and the gradient
    norm before clipping, both still on the device. The optimizer step is the caller's."""
    with autocast(fast, device):
        loss = step_module(x, labels, t, noise)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)  # clip the true gradients (a no-op unless fp16)
    grad_norm = torch.nn.utils.clip_grad_norm_(
        [p for group in optimizer.param_groups for p in group["params"]], max_norm, foreach=True
    )
    return loss.detach(), grad_norm


def restore(resume: dict[str, Any], diffusion: GaussianDiffusion, optimizer: torch.optim.Optimizer,
            batches: TrainingBatches, ranks: Ranks) -> LoopState:  # fmt: skip
    """Puts weights, EMA, optimizer and data position back from a checkpoint (on every rank); returns the loop's
    state. The random streams are restored by the loop itself, right before its first step."""
    diffusion.model.load_state_dict(resume["model"])
    if diffusion.ema is not None and resume.get("ema") is not None:
        diffusion.ema.load_state_dict(resume["ema"])
    optimizer.load_state_dict(resume["optimizer"])
    batches.load_state_dict(resume["data"])
    loop = LoopState.from_state_dict(resume["loop"])
    if not ranks.is_main:  # the saved running sums are the total over all ranks, kept by rank 0
        loop.loss_sum = torch.zeros(())
    return loop


def restore_random_streams(rng: dict[str, Any], noise: torch.Generator, ranks: Ranks) -> None:
    noise.set_state(rng["noise"].cpu())
    if len(rng["ranks"]) == ranks.world_size:
        restore_rng_state(rng["ranks"][ranks.rank])
    else:
        log.warning("the checkpoint was written by %d ranks and this run has %d: dropout draws start afresh",
                    len(rng["ranks"]), ranks.world_size)  # fmt: skip


def train(
    diffusion: GaussianDiffusion,
    optimizer: torch.optim.Optimizer,
    batches: TrainingBatches,
    settings: TrainSettings,
    *,
    device: torch.device,
    run_dir: Path,
    logger: Any,
    config: dict[str, Any],
    test_loader: DataLoader | None = None,
    resume: dict[str, Any] | None = None,
    resume_path: str | Path | None = None,
    ranks: Ranks = Ranks(),
    sampler: Callable[..., torch.Tensor] = ddpm_ancestral,
    guidance_scale: float = 0.0,
    evaluator: Callable[[GaussianDiffusion], float] | None = None,
    fast: FastPaths = FastPaths(),
) -> dict[str, Any]:
    """Runs settings.iterations optimizer steps (or until early stopping) and returns a summary.

    With `resume` (the contents of a checkpoint this loop wrote, read from `resume_path`), continues that run
    where it stopped, bit for bit. With several `ranks`, each rank trains on its share of every global batch;
    rank 0 alone logs, samples and writes checkpoints (`logger` is only used there). Every
    `settings.eval_rate` steps, rank 0's `evaluator` gives a FID of the weights; the best one's checkpoint is
    kept as best.pt, and `early_stop_metric=fid` stops when the FID has not improved for a while. `fast` holds
    the speed switches: the network has been prepared for them (layout, compilation) by the caller.
    """
    if settings.eval_rate and ranks.is_main and evaluator is None:
        raise ValueError("trainer.eval_rate > 0 needs an evaluator (a function of the diffusion giving a FID)")
    model = diffusion.model
    num_classes = model.num_classes if settings.use_labels else None
    base_lrs = [group["lr"] for group in optimizer.param_groups]  # from the config, also when resuming
    checkpoint_dir = run_dir / "checkpoints"
    loop = restore(resume, diffusion, optimizer, batches, ranks) if resume else LoopState()
    loop.to(device)
    last_saved = (Path(resume_path), loop.step) if resume else None
    # Timesteps and noise of the whole global batch, from one stream that every rank draws alike: each rank
    # takes its share, so the result does not depend on how many ranks share the batch.
    noise_stream = torch.Generator(device).manual_seed(settings.seed)
    global_batch = batches.batch_size * ranks.world_size
    share = slice(ranks.rank * batches.batch_size, (ranks.rank + 1) * batches.batch_size)
    step_module = (
        DistributedDataParallel(diffusion, device_ids=[device] if device.type == "cuda" else None)
        if ranks.distributed
        else diffusion
    )  # fmt: skip
    stop_signal = StopSignal()
    scaler = grad_scaler(fast, device)
    layout = memory_format(fast)
    # A fused optimizer (or fp16's grad scaler) skips a non-finite step on the device; the loop then learns
    # of it at the next log or checkpoint instead of synchronizing with the device at every step.
    skips_on_device = optimizer_skips_on_device(optimizer, scaler)

    def is_periodic(step: int) -> bool:
        return settings.checkpoint_rate > 0 and step % settings.checkpoint_rate == 0

    def checkpoint(step: int) -> None:
        """Every rank takes part (random streams and running sums are gathered); rank 0 writes."""
        nonlocal last_saved
        check_faults()
        per_rank_rng = gather_to_main(capture_rng_state(), ranks)
        sum_across_ranks(loop.loss_sum, ranks)
        if not ranks.is_main:
            loop.loss_sum.zero_()  # rank 0 holds the total now
            last_saved = (checkpoint_dir / "last.pt", step)
            return
        state = {
            "model": model.state_dict(),
            "ema": diffusion.ema.state_dict() if diffusion.ema is not None else None,
            "optimizer": optimizer.state_dict(),
            "step": step,
            "config": config,
            "loop": {**loop.state_dict(), "wall_time_s": loop.wall_time_s + time.perf_counter() - started},
            "data": batches.state_dict(),
            "rng": {"noise": noise_stream.get_state(), "ranks": per_rank_rng},
            "logger": logger.state_dict(),
        }
        periodic = checkpoint_dir / periodic_name(step)
        save_checkpoint(checkpoint_dir / "last.pt", state, also=(periodic,) if is_periodic(step) else ())
        last_saved = (checkpoint_dir / "last.pt", step)
        for path in prune_periodic(checkpoint_dir, settings.keep_checkpoints):
            log.info("removed %s (trainer.keep_checkpoints=%d)", path.name, settings.keep_checkpoints)

    def grid(step: int, name: str) -> Path:
        images = sample_grid(diffusion, device=device, columns=settings.grid_columns, num_classes=num_classes,
                             sampler=sampler, guidance_scale=guidance_scale)  # fmt: skip
        path = save_grid(images, run_dir / "samples" / name, columns=settings.grid_columns)
        logger.log_image("samples", path, step, caption=f"step {step}")
        return path

    def evaluate(step: int) -> None:
        """A FID on rank 0; a new best is saved as best.pt. Every rank learns whether to stop."""
        improved = False
        if ranks.is_main:
            fid = evaluator(diffusion)
            improved = fid < loop.best_fid
            loop.best_fid, loop.evals_since_best = (fid, 0) if improved else (loop.best_fid, loop.evals_since_best + 1)
            logger.log({"fid": fid, "best_fid": loop.best_fid}, step)
            log.info("step %d  fid %.4g  (best %.4g)", step, fid, loop.best_fid)
        if any_rank(improved, ranks, device):
            if last_saved != (checkpoint_dir / "last.pt", step):
                checkpoint(step)
            if ranks.is_main:
                copy_checkpoint(checkpoint_dir / "last.pt", checkpoint_dir / "best.pt")
        patience_spent = loop.evals_since_best >= settings.early_stop_patience
        if any_rank(settings.early_stop_metric == "fid" and patience_spent, ranks, device):
            log.info("early stop at step %d: no better FID in %d evaluations", step, settings.early_stop_patience)
            loop.stopped_early = True

    def refuse_nonfinite(what: str) -> None:
        saved = (f"the last intact checkpoint is {last_saved[0]} (step {last_saved[1]})" if last_saved
                 else "no checkpoint has been written yet")  # fmt: skip
        raise NonFiniteError(
            f"{what}. The weights were not updated with it; {saved}. Lower optimizer.lr, set trainer.warmup or "
            f"trainer.grad_clip, or let trainer.skip_nonfinite=N skip up to N such steps (now {settings.skip_nonfinite})."
        )

    def check_faults() -> None:
        """Reads the device's count of skipped non-finite steps (a host sync: at logs, checkpoints, the end)."""
        faults = int(loop.faults.item())
        if faults == loop.skipped_nonfinite:
            return
        new, loop.skipped_nonfinite = faults - loop.skipped_nonfinite, faults
        last = int(loop.last_fault_step.item())
        if faults > settings.skip_nonfinite:
            refuse_nonfinite(f"step {last}: the loss or the gradient norm is not finite ({faults} such steps so far)")
        log.warning("%d step(s) up to step %d had a non-finite loss or gradient norm and were skipped (%d of at most %d)",
                    new, last, faults, settings.skip_nonfinite)  # fmt: skip

    metrics: dict[str, float] = {}
    grid_path = None
    started = interval_start = time.perf_counter()
    interval_iterations = 0
    model.train()
    if resume:
        restore_random_streams(resume["rng"], noise_stream, ranks)  # last: building the model drew numbers too
    bar = tqdm(total=settings.iterations, initial=loop.step, desc="training", dynamic_ncols=True,
               disable=not (sys.stderr.isatty() and ranks.is_main))  # fmt: skip
    try:
        while loop.step < settings.iterations and not loop.stopped_early:
            for group, base_lr in zip(optimizer.param_groups, base_lrs):
                group["lr"] = warmup_lr(loop.step, base_lr, settings.warmup)
            x, y = next(batches)
            x = x.to(device, non_blocking=True, memory_format=layout)
            labels = y.to(device, non_blocking=True) if settings.use_labels else None
            t, noise = diffusion.training_noise(global_batch, device, noise_stream)
            if labels is not None and settings.label_dropout > 0:  # drawn for the global batch too
                dropped = torch.rand(global_batch, device=device, generator=noise_stream) < settings.label_dropout
                labels = torch.where(dropped[share], model.null_label, labels)

            loss, grad_norm = forward_backward(step_module, optimizer, scaler, x, labels, t[share],
                                               noise[share].contiguous(memory_format=layout), fast=fast,
                                               device=device, max_norm=settings.max_grad_norm)  # fmt: skip
            loop.step += 1
            interval_iterations += 1
            # The gradients (so their norm) are the same on every rank, so every rank decides alike.
            finite = torch.isfinite(loss + grad_norm)
            if skips_on_device:
                step_unless_nonfinite(optimizer, scaler, finite)
                diffusion.update_ema()
                # Under fp16 an overflowing gradient is the scaler's business; only a non-finite loss is a fault.
                loop.add_step(loss, grad_norm, finite, ~torch.isfinite(loss) if scaler.is_enabled() else ~finite)
            elif bool(finite):  # one host sync: a non-finite step must not reach the weights
                optimizer.step()
                diffusion.update_ema()
                loop.add_step(loss, grad_norm, finite, ~finite)
            else:
                optimizer.zero_grad(set_to_none=True)
                loop.skipped_nonfinite += 1
                loop.faults += 1
                if loop.skipped_nonfinite > settings.skip_nonfinite:
                    refuse_nonfinite(f"step {loop.step}: the loss is {loss.item():.4g} and the gradient norm "
                                     f"{grad_norm.item():.4g}")  # fmt: skip
                log.warning("step %d: non-finite loss %.4g or gradient norm %.4g; step skipped (%d of at most %d)",
                            loop.step, loss.item(), grad_norm.item(), loop.skipped_nonfinite, settings.skip_nonfinite)
            bar.update()

            if settings.log_rate and loop.step % settings.log_rate == 0:
                check_faults()
                metrics = log_interval(loop, optimizer, settings, ranks, images=interval_iterations * global_batch,
                                       seconds=time.perf_counter() - interval_start)  # fmt: skip
                if ranks.is_main:
                    if test_loader is not None:
                        metrics["test_loss"] = estimate_test_loss(
                            diffusion, test_loader, device=device, use_labels=settings.use_labels,
                            max_batches=settings.test_batches,
                        )  # fmt: skip
                    logger.log(metrics, loop.step)
                    log.info("step %d/%d  %s", loop.step, settings.iterations,
                             "  ".join(f"{k} {v:.4g}" for k, v in metrics.items()))  # fmt: skip
                    if "train_loss" in metrics:
                        bar.set_postfix(loss=f"{metrics['train_loss']:.4f}")
                interval_iterations, interval_start = 0, time.perf_counter()
                if settings.early_stop_metric == "train_loss" and should_stop_early(
                    loop.interval_losses, settings.early_stop_loss_change
                ):
                    log.info("early stop at step %d: the train loss changed by less than %g per interval",
                             loop.step, settings.early_stop_loss_change)  # fmt: skip
                    loop.stopped_early = True
            if settings.eval_rate and loop.step % settings.eval_rate == 0:
                evaluate(loop.step)  # before the checkpoint of this step, which then holds the new best FID
            stopping = any_rank(stop_signal.requested, ranks, device)
            if (is_periodic(loop.step) or stopping) and last_saved != (checkpoint_dir / "last.pt", loop.step):
                checkpoint(loop.step)
            if stopping:
                barrier(ranks)  # the checkpoint is on disk before anyone requeues
                stop_signal.hand_over(loop.step)
            if ranks.is_main and settings.sample_rate and loop.step % settings.sample_rate == 0:
                grid_path = grid(loop.step, f"step_{loop.step:07d}.png")
    finally:
        bar.close()
        stop_signal.close()

    step = loop.step
    check_faults()
    if last_saved != (checkpoint_dir / "last.pt", step):  # else this step's last.pt is on disk already
        checkpoint(step)
    # Data parallelism keeps the replicas equal; say so, from a digest of each rank's weights.
    weight_digests = gather_to_main(content_digest({"model": model.state_dict()}), ranks)
    if ranks.is_main and len(set(weight_digests)) > 1:
        log.warning("the ranks ended with different weights: %s", weight_digests)
    if ranks.is_main and settings.sample_at_end:
        if grid_path is not None and grid_path.name == f"step_{step:07d}.png":  # this step's grid exists
            grid_path = Path(shutil.copyfile(grid_path, run_dir / "samples" / "final.png"))
        else:
            grid_path = grid(step, "final.png")
    return {
        "steps": step,
        "train_loss": metrics.get("train_loss"),
        "test_loss": metrics.get("test_loss"),
        "stopped_early": loop.stopped_early,
        "skipped_nonfinite": loop.skipped_nonfinite,
        "resumed_from_step": resume["step"] if resume else None,
        "wall_time_s": loop.wall_time_s + time.perf_counter() - started,
        "sample_grid": str(grid_path) if grid_path else None,
        "checkpoint": str(checkpoint_dir / "last.pt"),
        "world_size": ranks.world_size,
        "rank_weight_digests": weight_digests,
        "best_fid": loop.best_fid if math.isfinite(loop.best_fid) else None,
        "best_checkpoint": str(checkpoint_dir / "best.pt") if math.isfinite(loop.best_fid) else None,
    }


def log_interval(loop: LoopState, optimizer: torch.optim.Optimizer, settings: TrainSettings, ranks: Ranks, *,
                 images: int, seconds: float) -> dict[str, float]:  # fmt: skip
    """The metrics of the interval since the last log (one host sync; one all-reduce across ranks), and a fresh
    interval in `loop`. Every rank gets the same numbers."""
    metrics: dict[str, float] = {}
    loss_sum = sum_across_ranks(loop.loss_sum.clone(), ranks)
    good_steps = int(loop.good_steps.item())
    if good_steps:
        metrics["train_loss"] = loss_sum.item() / (good_steps * ranks.world_size)
        metrics["grad_norm"] = loop.grad_norm_sum.item() / good_steps
        loop.interval_losses.append(metrics["train_loss"])
    metrics["lr"] = optimizer.param_groups[0]["lr"]
    metrics["images_per_s"] = images / max(seconds, 1e-9)
    if settings.skip_nonfinite:
        metrics["skipped_nonfinite"] = loop.skipped_nonfinite
    loop.loss_sum.zero_()
    loop.grad_norm_sum.zero_()
    loop.good_steps.zero_()
    return metrics
