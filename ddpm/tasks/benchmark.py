"""task=benchmark: training and sampling throughput of the configured model, on synthetic data of the dataset's
shape (no dataset needed), with the same fast paths and the same step functions the trainer uses."""

import dataclasses
import datetime
import json
import logging
from pathlib import Path
from typing import ClassVar

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ddpm.config.validation import Validated, at_least, build_settings
from ddpm.data.device import DeviceBatches, InMemoryImages
from ddpm.data.loader import TrainingBatches
from ddpm.data.synthetic import SyntheticImages
from ddpm.diffusion.build import build_diffusion
from ddpm.runtime.devices import configure_backends, resolve_device
from ddpm.runtime.fast_paths import automatic_precision, memory_format, prepare_diffusion, resolve_precision
from ddpm.runtime.rng import seed_everything
from ddpm.runtime.throughput import (
    count_flops,
    device_name,
    peak_memory_gib,
    peak_tflops,
    reset_peak_memory,
    synchronize,
    time_calls,
)
from ddpm.training.optimizer import build_optimizer
from ddpm.training.settings import TrainSettings
from ddpm.training.update import UpdateStep

log = logging.getLogger(__name__)


# Batches per device when benchmark.batch_size / sample_batch_size are null: the DDPM paper's CIFAR-10 batch on a
# GPU; on a CPU, where one step of the 35.7M model at batch 128 takes half a minute, a batch that times in seconds.
DEFAULT_BATCHES = {"cuda": (128, 256), "cpu": (16, 64)}


@dataclasses.dataclass
class BenchmarkSettings(Validated):
    """The `benchmark` node of conf/task/benchmark.yaml."""

    SECTION: ClassVar[str] = "benchmark"

    batch_size: int | None = at_least(1, None, note="null = by device")
    sample_batch_size: int | None = at_least(1, None, note="null = by device")
    warmup_steps: int = at_least(0, 5)  # untimed steps first (torch.compile compiles during these)
    warmup_seconds: float = at_least(0, 10.0)  # ... or fewer, but at least one, once they have taken this long
    steps: int = at_least(1, 20)  # timed steps of each kind, or fewer when they take longer than max_seconds
    max_seconds: float = at_least(1e-3, 15.0)
    data_batches: int = at_least(1, 50)
    precisions: list[str] | None = None  # null: the trainer's, and on a CPU with bf16 units fp32 and bf16
    device: str = "auto"

    def batches(self, device: torch.device) -> tuple[int, int]:
        training, sampling = DEFAULT_BATCHES["cuda" if device.type == "cuda" else "cpu"]
        return self.batch_size or training, self.sample_batch_size or sampling


def precisions_to_time(bench: BenchmarkSettings, trained: str, device: torch.device) -> list[str]:
    """benchmark.precisions, each checked; or the precision training would use, first, and on a CPU the other of
    fp32/bf16 when bf16 pays there (without bf16 units it is emulated: many times slower, said in the log)."""
    if bench.precisions is not None:
        return [resolve_precision("benchmark.precisions", precision, device) for precision in bench.precisions] or [
            trained
        ]
    if device.type == "cuda":
        return [trained]
    choice, reason = automatic_precision(device)
    if choice == "bf16":
        return [trained, "fp32" if trained == "bf16" else "bf16"]
    log.info("bf16 is not timed: %s; benchmark.precisions=[fp32,bf16] times it anyway", reason)
    return [trained]


def run(cfg: DictConfig) -> dict:
    """YAML -> settings -> diffusion -> optimizer -> FLOPs (eager) -> fast paths -> timings: data, then for each
    precision the training step and the sampling step -> table, JSON line and <run dir>/benchmark.json."""
    bench: BenchmarkSettings = build_settings(cfg.benchmark)
    settings: TrainSettings = build_settings(cfg.trainer)
    device = resolve_device(bench.device, "benchmark.device")
    configure_backends(device, deterministic=False)
    seed_everything(settings.seed)

    diffusion = build_diffusion(cfg).to(device)
    model = diffusion.model
    optimizer = build_optimizer(cfg, model.parameters())
    fast = settings.fast_paths(device)
    precisions = precisions_to_time(bench, fast.precision, device)
    batch, sample_batch = bench.batches(device)
    shape = (diffusion.channels, diffusion.image_size, diffusion.image_size)
    num_classes = model.num_classes
    x = torch.rand(batch, *shape, device=device) * 2 - 1
    labels = torch.randint(0, num_classes, (batch,), device=device) if num_classes else None
    sample_labels = torch.randint(0, num_classes, (sample_batch,), device=device) if num_classes else None

    # FLOPs are a property of the architecture: counted once, eagerly, before compilation.
    train_flops = count_flops(lambda: diffusion(x, labels).backward()) / batch
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        sample_flops = (
            count_flops(lambda: model(x, torch.zeros(batch, dtype=torch.long, device=device), labels)) / batch
        )

    prepare_diffusion(diffusion, fast)
    layout = memory_format(fast)
    noise_stream = torch.Generator(device).manual_seed(settings.seed)
    x = x.contiguous(memory_format=layout)
    x_sample = torch.randn(sample_batch, *shape, device=device).contiguous(memory_format=layout)
    t_sample = torch.full((sample_batch,), diffusion.num_timesteps // 2, device=device)
    timing = dict(device=device, max_seconds=bench.max_seconds)
    warm = dict(warmup=bench.warmup_steps, warmup_seconds=bench.warmup_seconds, calls=bench.steps, min_calls=1)

    batches = synthetic_batches(bench, batch, shape, num_classes or 1, fast.data_on_device, settings, device)
    data_seconds, data_batches = time_calls(lambda: next(batches), **timing, warmup=2, calls=bench.data_batches)

    timed = {}
    reset_peak_memory(device)
    for precision in precisions:
        update = UpdateStep(
            diffusion,
            optimizer,
            diffusion.update_ema,
            fast=dataclasses.replace(fast, precision=precision),
            device=device,
            max_grad_norm=settings.max_grad_norm,
        )
        denoise = diffusion.denoiser(sample_labels, precision=precision)

        def train_step() -> None:
            """What the trainer does per step, from a batch already on the device to the EMA update."""
            t, noise = diffusion.training_noise(batch, device, noise_stream)
            update(x, labels, t, noise.contiguous(memory_format=layout))  # noqa: B023 (timed in this iteration)

        @torch.no_grad()
        def sample_step() -> None:
            """One network evaluation of a sampler (the EMA weights, as sampling uses them)."""
            denoise(x_sample, t_sample)  # noqa: B023 (timed in this iteration)

        model.train()
        train_seconds, train_steps = time_calls(train_step, **timing, **warm)
        synchronize(device)
        sample_seconds, sample_steps = time_calls(sample_step, **timing, **warm)
        timed[precision] = {
            "train_images_per_s": batch / train_seconds,
            "train_step_ms": train_seconds * 1e3,
            "train_steps_timed": train_steps,
            "sample_images_per_s": sample_batch / sample_seconds,
            "sample_steps_timed": sample_steps,
        }
        log.info(
            "%s: training %.1f images/s, sampling %.1f images/s per network evaluation",
            precision,
            timed[precision]["train_images_per_s"],
            timed[precision]["sample_images_per_s"],
        )
    train_memory = peak_memory_gib(device)

    main = timed[precisions[0]]
    peak = peak_tflops(device, precisions[0])
    result = {
        "device": device_name(device),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        **{key: value for key, value in vars(fast).items()},
        "precision": precisions[0],
        "optimizer_fused": bool(optimizer.defaults.get("fused")),
        "parameters": sum(p.numel() for p in model.parameters()),
        "batch_size": batch,
        **{key: main[key] for key in ("train_images_per_s", "train_step_ms", "train_steps_timed")},
        "train_gflop_per_image": train_flops / 1e9,
        "train_tflops": train_flops * main["train_images_per_s"] / 1e12,
        "train_peak_fraction": train_flops * main["train_images_per_s"] / 1e12 / peak if peak else None,
        "data_ms_per_batch": data_seconds * 1e3,
        "data_images_per_s": batch / data_seconds,
        "data_batches_timed": data_batches,
        "data_source": type(batches).__name__,
        "sample_batch_size": sample_batch,
        "sample_images_per_s": main["sample_images_per_s"],
        "sample_gflop_per_image": sample_flops / 1e9,
        "sample_tflops": sample_flops * main["sample_images_per_s"] / 1e12,
        "sample_peak_fraction": sample_flops * main["sample_images_per_s"] / 1e12 / peak if peak else None,
        "peak_tflops": peak,
        "peak_memory_gib": train_memory,
        "peak_memory_kind": "GPU, allocated while training" if device.type == "cuda" else "host RSS of the process",
        "by_precision": timed,
    }
    print(format_table(result))
    print(json.dumps(result))
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    (run_dir / "benchmark.json").write_text(json.dumps(result, indent=2))
    return result


def synthetic_batches(
    bench: BenchmarkSettings,
    batch: int,
    shape: tuple[int, int, int],
    num_classes: int,
    on_device: bool,
    settings: TrainSettings,
    device: torch.device,
) -> DeviceBatches | TrainingBatches:
    """Random images through the data path training would take: one tensor on the device, or PIL images
    decoded and transformed in DataLoader workers, as CIFAR-10's are."""
    count = max(batch * 4, 1024)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (count, *shape), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, num_classes, (count,), generator=generator)
    if on_device:
        return DeviceBatches(InMemoryImages(images, labels, random_flip=True), batch, seed=0, device=device)
    return TrainingBatches(
        SyntheticImages(images, labels),
        batch,
        seed=0,
        num_workers=settings.data_workers(device),
        pin_memory=device.type == "cuda",
    )


def format_table(result: dict) -> str:
    """The numbers a person reads, one per line."""

    def share(fraction: float | None) -> str:
        return f" ({fraction:.1%} of the {result['peak_tflops']:g} TFLOP/s peak)" if fraction else ""

    rows = [
        ("device", result["device"]),
        (
            "fast paths",
            f"precision={result['precision']} channels_last={result['channels_last']} "
            f"compile={result['compile']} fused_optimizer={result['optimizer_fused']} "
            f"data_on_device={result['data_on_device']}",
        ),
        ("model", f"{result['parameters'] / 1e6:.2f}M parameters, batch {result['batch_size']}"),
        (
            "training",
            f"{result['train_images_per_s']:,.1f} images/s ({result['train_step_ms']:.1f} ms/step, "
            f"{result['train_steps_timed']} steps timed)",
        ),
        (
            "training compute",
            f"{result['train_gflop_per_image']:.2f} GFLOP/image -> "
            f"{result['train_tflops']:.3f} TFLOP/s{share(result['train_peak_fraction'])}",
        ),
        (
            "data",
            f"{result['data_ms_per_batch']:.2f} ms/batch ({result['data_images_per_s']:,.0f} images/s, "
            f"{result['data_source']})",
        ),
        (
            "sampling",
            f"{result['sample_images_per_s']:,.1f} images/s per network evaluation "
            f"(batch {result['sample_batch_size']})",
        ),
        (
            "sampling compute",
            f"{result['sample_gflop_per_image']:.2f} GFLOP/image -> "
            f"{result['sample_tflops']:.3f} TFLOP/s{share(result['sample_peak_fraction'])}",
        ),
        ("peak memory", f"{result['peak_memory_gib']:.2f} GiB ({result['peak_memory_kind']})"),
    ]
    if len(result["by_precision"]) > 1:  # one row per precision, side by side
        rows += [
            (
                f"{precision}",
                f"training {row['train_images_per_s']:,.1f} images/s ({row['train_step_ms']:.0f} ms/step); "
                f"sampling {row['sample_images_per_s']:,.1f} images/s"
                + (
                    f"; {row['train_step_ms'] / result['train_step_ms']:.2f}x the step time of {result['precision']}"
                    if precision != result["precision"]
                    else ""
                ),
            )
            for precision, row in result["by_precision"].items()
        ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
