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

from ddpm.build import build_diffusion, build_optimizer
from ddpm.data.device import DeviceBatches, InMemoryImages
from ddpm.data.loader import TrainingBatches
from ddpm.data.synthetic import SyntheticImages
from ddpm.devices import configure_backends, resolve_device
from ddpm.fast_paths import memory_format, prepare_diffusion
from ddpm.rng import seed_everything
from ddpm.throughput import (
    count_flops, device_name, peak_memory_gib, peak_tflops, reset_peak_memory, synchronize, time_calls,
)  # fmt: skip
from ddpm.train_settings import TrainSettings
from ddpm.update import UpdateStep
from ddpm.validation import Validated, at_least, build_settings

log = logging.getLogger(__name__)


@dataclasses.dataclass
class BenchmarkSettings(Validated):
    """The `benchmark` node of conf/task/benchmark.yaml."""

    SECTION: ClassVar[str] = "benchmark"

    batch_size: int = at_least(1, 128)
    sample_batch_size: int = at_least(1, 256)
    warmup_steps: int = at_least(0, 5)  # untimed steps first (torch.compile compiles during these)
    steps: int = at_least(1, 20)  # timed steps of each kind, or fewer when they take longer than max_seconds
    max_seconds: float = at_least(1e-3, 60.0)
    data_batches: int = at_least(1, 50)
    device: str = "auto"


def run(cfg: DictConfig) -> dict:
    """YAML -> settings -> diffusion -> optimizer -> FLOPs (eager) -> fast paths -> timings: data, training step,
    sampling step -> table, JSON line and <run dir>/benchmark.json."""
    bench: BenchmarkSettings = build_settings(cfg.benchmark)
    settings: TrainSettings = build_settings(cfg.trainer)
    device = resolve_device(bench.device, "benchmark.device")
    configure_backends(device, deterministic=False)
    seed_everything(settings.seed)

    diffusion = build_diffusion(cfg).to(device)
    model = diffusion.model
    optimizer = build_optimizer(cfg, model.parameters())
    fast = settings.fast_paths(device)
    batch, sample_batch = bench.batch_size, bench.sample_batch_size
    shape = (diffusion.channels, diffusion.image_size, diffusion.image_size)
    num_classes = model.num_classes
    x = torch.rand(batch, *shape, device=device) * 2 - 1
    labels = torch.randint(0, num_classes, (batch,), device=device) if num_classes else None
    sample_labels = torch.randint(0, num_classes, (sample_batch,), device=device) if num_classes else None

    # FLOPs are a property of the architecture: counted once, eagerly, before compilation.
    train_flops = count_flops(lambda: diffusion(x, labels).backward()) / batch
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        sample_flops = count_flops(lambda: model(x, torch.zeros(batch, dtype=torch.long, device=device), labels)) / batch

    prepare_diffusion(diffusion, fast)
    layout = memory_format(fast)
    update = UpdateStep(diffusion, optimizer, diffusion.update_ema, fast=fast, device=device,
                        max_grad_norm=settings.max_grad_norm)  # fmt: skip
    noise_stream = torch.Generator(device).manual_seed(settings.seed)
    x = x.contiguous(memory_format=layout)
    timing = dict(device=device, max_seconds=bench.max_seconds)

    batches = synthetic_batches(bench, shape, num_classes or 1, fast.data_on_device, settings, device)
    data_seconds, data_batches = time_calls(lambda: next(batches), **timing, warmup=2, calls=bench.data_batches)

    def train_step() -> None:
        """What the trainer does per step, from a batch already on the device to the EMA update."""
        t, noise = diffusion.training_noise(batch, device, noise_stream)
        update(x, labels, t, noise.contiguous(memory_format=layout))

    predict = diffusion.noise_predictor(sample_labels, precision=fast.precision)
    x_sample = torch.randn(sample_batch, *shape, device=device).contiguous(memory_format=layout)
    t_sample = torch.full((sample_batch,), diffusion.num_timesteps // 2, device=device)

    @torch.no_grad()
    def sample_step() -> None:
        """One network evaluation of a sampler (the EMA weights, as sampling uses them)."""
        predict(x_sample, t_sample)

    model.train()
    reset_peak_memory(device)
    train_seconds, train_steps = time_calls(train_step, **timing, warmup=bench.warmup_steps, calls=bench.steps)
    train_memory = peak_memory_gib(device)
    synchronize(device)
    sample_seconds, sample_steps = time_calls(sample_step, **timing, warmup=bench.warmup_steps, calls=bench.steps)

    peak = peak_tflops(device, fast.precision)
    train_images_per_s = batch / train_seconds
    sample_images_per_s = sample_batch / sample_seconds
    result = {
        "device": device_name(device),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        **{key: value for key, value in vars(fast).items()},
        "optimizer_fused": bool(optimizer.defaults.get("fused")),
        "parameters": sum(p.numel() for p in model.parameters()),
        "batch_size": batch,
        "train_images_per_s": train_images_per_s,
        "train_step_ms": train_seconds * 1e3,
        "train_steps_timed": train_steps,
        "train_gflop_per_image": train_flops / 1e9,
        "train_tflops": train_flops * train_images_per_s / 1e12,
        "train_peak_fraction": train_flops * train_images_per_s / 1e12 / peak if peak else None,
        "data_ms_per_batch": data_seconds * 1e3,
        "data_images_per_s": batch / data_seconds,
        "data_batches_timed": data_batches,
        "data_source": type(batches).__name__,
        "sample_batch_size": sample_batch,
        "sample_images_per_s": sample_images_per_s,
        "sample_gflop_per_image": sample_flops / 1e9,
        "sample_tflops": sample_flops * sample_images_per_s / 1e12,
        "sample_peak_fraction": sample_flops * sample_images_per_s / 1e12 / peak if peak else None,
        "peak_tflops": peak,
        "peak_memory_gib": train_memory,
        "peak_memory_kind": "GPU, allocated while training" if device.type == "cuda" else "host RSS of the process",
    }
    print(format_table(result))
    print(json.dumps(result))
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    (run_dir / "benchmark.json").write_text(json.dumps(result, indent=2))
    return result


def synthetic_batches(bench: BenchmarkSettings, shape: tuple[int, int, int], num_classes: int, on_device: bool,
                      settings: TrainSettings, device: torch.device) -> DeviceBatches | TrainingBatches:  # fmt: skip
    """Random images through the data path training would take: one tensor on the device, or PIL images
    decoded and transformed in DataLoader workers, as CIFAR-10's are."""
    count = max(bench.batch_size * 4, 1024)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (count, *shape), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, num_classes, (count,), generator=generator)
    if on_device:
        return DeviceBatches(InMemoryImages(images, labels, random_flip=True), bench.batch_size, seed=0, device=device)
    return TrainingBatches(SyntheticImages(images, labels), bench.batch_size, seed=0, num_workers=settings.num_workers,
                           pin_memory=device.type == "cuda")  # fmt: skip


def format_table(result: dict) -> str:
    """The numbers a person reads, one per line."""

    def share(fraction: float | None) -> str:
        return f" ({fraction:.1%} of the {result['peak_tflops']:g} TFLOP/s peak)" if fraction else ""

    rows = [
        ("device", result["device"]),
        ("fast paths", f"precision={result['precision']} channels_last={result['channels_last']} "
                       f"compile={result['compile']} fused_optimizer={result['optimizer_fused']} "
                       f"data_on_device={result['data_on_device']}"),  # fmt: skip
        ("model", f"{result['parameters'] / 1e6:.2f}M parameters, batch {result['batch_size']}"),
        ("training", f"{result['train_images_per_s']:,.1f} images/s ({result['train_step_ms']:.1f} ms/step, "
                     f"{result['train_steps_timed']} steps timed)"),  # fmt: skip
        ("training compute", f"{result['train_gflop_per_image']:.2f} GFLOP/image -> "
                             f"{result['train_tflops']:.3f} TFLOP/s{share(result['train_peak_fraction'])}"),  # fmt: skip
        ("data", f"{result['data_ms_per_batch']:.2f} ms/batch ({result['data_images_per_s']:,.0f} images/s, "
                 f"{result['data_source']})"),  # fmt: skip
        ("sampling", f"{result['sample_images_per_s']:,.1f} images/s per network evaluation "
                     f"(batch {result['sample_batch_size']})"),  # fmt: skip
        ("sampling compute", f"{result['sample_gflop_per_image']:.2f} GFLOP/image -> "
                             f"{result['sample_tflops']:.3f} TFLOP/s{share(result['sample_peak_fraction'])}"),  # fmt: skip
        ("peak memory", f"{result['peak_memory_gib']:.2f} GiB ({result['peak_memory_kind']})"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
