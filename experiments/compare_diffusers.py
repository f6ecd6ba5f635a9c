"""Times this project's training step against diffusers' `UNet2DModel`, in one process, on one device.

What it measures
----------------
One optimizer step of each side, from a batch already on the device to the EMA update, on identical work:

* ours: the model, optimizer, EMA and fast paths that `python main.py` trains with (composed from `conf/` with
  Hydra, plus any overrides given on the command line), stepped by the trainer's own update,
  `ddpm.training.update.UpdateStep` (autocast forward, backward, clip to trainer.grad_clip, the optimizer step skipped on
  the device when non-finite, the EMA update), as `ddpm.tasks.benchmark` does.
* diffusers: `diffusers.UNet2DModel` configured as the `google/ddpm-cifar10-32` architecture (built from the
  config in code; no weights are downloaded), wrapped in the same epsilon-prediction loss (our schedule's
  q_sample, MSE to the noise) and stepped by the very same `UpdateStep`, with an optimizer from the same
  `optimizer` config node (so the same Adam, lr and fused setting), the same `ddpm.model.ema.EMA`
  (torch._foreach_lerp_ with trainer.ema_decay), the same autocast precision, channels_last layout and
  `module.compile()`. The only difference is the network.

Both networks must have the same number of parameters (35,746,307 at the defaults); the script stops otherwise.
Both sides are warmed up (torch.compile compiles then), then timed in alternating rounds (ours, diffusers, ours,
diffusers, ...), draining the device around each round, so that drifting clocks or other load on a shared
machine hit both sides alike. It prints each side's median ms/step and images/s, the ratio
diffusers time / our time (> 1 means ours is faster), the per-round ratios, and a JSON line with everything.

The architecture: the DDPM paper's CIFAR-10 model attends at 16x16 on the down and the up path, as ours does,
and so does diffusers' side by default. The hub's google/ddpm-cifar10-32 config.json puts the up path's
attention in its second up block, which runs at 8x8: the same parameter count, 3.9% fewer FLOPs.
`--attention hub` times that published config instead (both FLOP counts are printed).

How to run it
-------------
    pip install -e ".[bench]"          # diffusers, the only extra this script needs
    python experiments/compare_diffusers.py                          # auto device, batch 128, device defaults
    python experiments/compare_diffusers.py --device cpu --batch-size 16 --rounds 3 --steps-per-round 2 --warmup 1
    python experiments/compare_diffusers.py --device cuda --precision bf16 --json model.dropout=0.1

Positional arguments are Hydra overrides of this project's config (`key=value`), as for main.py.
Device defaults mirror trainer.*: on CUDA bf16 (where supported), channels_last and compile on; on CPU eager,
in bf16 where the processor has AMX-BF16 or AVX512-BF16 and in fp32 elsewhere. `--profile` also prints each side's top operators by self CPU time for one step.

On a CPU that others share, wall-clock rounds swing by tens of percent; `--threads 1` and the CPU-time line
(this process's CPU seconds per step) are then the steadier comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the ddpm package of this checkout, also when it is not installed

from ddpm.config.errors import UserError
from ddpm.config.validation import build_settings
from ddpm.diffusion.build import build_diffusion
from ddpm.diffusion.gaussian import GaussianDiffusion
from ddpm.diffusion.objectives import extract
from ddpm.model.ema import EMA
from ddpm.runtime.devices import configure_backends, resolve_device
from ddpm.runtime.fast_paths import FastPaths, memory_format, prepare_network
from ddpm.runtime.throughput import count_flops, device_name, synchronize
from ddpm.training.optimizer import build_optimizer
from ddpm.training.settings import TrainSettings
from ddpm.training.update import UpdateStep

EXPECTED_PARAMETERS = 35_746_307  # ddpm.model.unet.UNet() at its defaults; printed for reference

# google/ddpm-cifar10-32's config.json (diffusers UNet2DModel). attention_head_dim=None means one head of all
# channels, as in the DDPM paper and in ours; the rest changes numerics (eps, padding side, embedding phase), not
# the work done, except downsample_padding=0's small F.pad before each of the three strided convolutions.
HUB_CONFIG: dict[str, Any] = {
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (128, 256, 256, 256),
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    "norm_num_groups": 32,
    "norm_eps": 1e-6,
    "act_fn": "silu",
    "attention_head_dim": None,
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "mid_block_scale_factor": 1,
    "time_embedding_type": "positional",
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "center_input_sample": False,
}
# The up path's attention at 16x16 (the third up block of four), where ours and the paper have it.
MIRRORED_UP_BLOCKS = ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")


def import_diffusers() -> Any:
    """diffusers is an optional extra: imported only here, with an error that says how to get it."""
    try:
        import diffusers
    except ImportError as error:
        raise SystemExit(
            'compare_diffusers.py needs diffusers, which is not installed: pip install -e ".[bench]" '
            f"(or pip install 'diffusers>=0.27') ({error})"
        ) from error
    return diffusers


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--precision",
        choices=("fp32", "bf16", "fp16"),
        default=None,
        help="autocast dtype of both sides (default: bf16 on CUDA where supported, else fp32)",
    )
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="NHWC weights and activations on both sides (default: on CUDA only)",
    )
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="module.compile() both networks (default: on CUDA only)",
    )
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per side, alternating")
    parser.add_argument("--steps-per-round", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument(
        "--attention",
        choices=("paper", "hub"),
        default="paper",
        help="paper (default): diffusers' up-path attention at 16x16, the DDPM paper's architecture "
        "and ours (equal FLOPs); hub: google/ddpm-cifar10-32's config.json as published, "
        "whose up-path attention runs at 8x8 (3.9%% fewer FLOPs)",
    )
    parser.add_argument("--profile", action="store_true", help="also profile one step of each side")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of this project's config, e.g. model.dropout=0.1")
    args = parser.parse_args(argv)
    for name in ("batch_size", "rounds", "steps_per_round"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    return args


def compose_config(args: argparse.Namespace) -> DictConfig:
    """This project's config, composed as `python main.py` would, with the flags turned into trainer.* overrides
    (only those given: the rest stay `auto`, resolved per device like the trainer does)."""
    os.environ.setdefault("DDPM_PROJECT_ROOT", str(REPO))  # conf/paths resolves against it
    overrides = ["logger=none", f"trainer.device={args.device}", f"trainer.batch_size={args.batch_size}"]
    if args.precision is not None:
        overrides.append(f"trainer.precision={args.precision}")
    if args.channels_last is not None:
        overrides.append(f"trainer.channels_last={str(args.channels_last).lower()}")
    if args.compile is not None:
        overrides.append(f"trainer.compile={str(args.compile).lower()}")
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=[*overrides, *args.overrides])


class DiffusersLoss(nn.Module):
    """diffusers' UNet in the same epsilon-prediction loss as ours: x_t from our schedule's buffers, MSE to the
    noise. Called as `module(x, labels, t, noise)`, like GaussianDiffusion, so the same step function drives it."""

    def __init__(self, unet: nn.Module, diffusion: GaussianDiffusion):
        super().__init__()
        self.unet = unet
        # Copies of the schedule (not the diffusion module, which would drag our network in as a submodule).
        self.register_buffer("sqrt_alphas_cumprod", diffusion.sqrt_alphas_cumprod.clone(), persistent=False)
        self.register_buffer(
            "sqrt_one_minus_alphas_cumprod", diffusion.sqrt_one_minus_alphas_cumprod.clone(), persistent=False
        )

    def forward(
        self, x0: torch.Tensor, labels: torch.Tensor | None, t: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        # q_sample's formula on the same buffers; the mean MSE is what diffusers' training example minimises.
        x_t = (
            extract(self.sqrt_alphas_cumprod, t, x0.shape) * x0
            + extract(self.sqrt_one_minus_alphas_cumprod, t, x0.shape) * noise
        )
        return F.mse_loss(self.unet(x_t, t).sample, noise)


def build_diffusers_unet(dropout: float, paper_attention: bool) -> nn.Module:
    """The google/ddpm-cifar10-32 architecture, freshly initialised; dropout as our model's, so both do the same
    work (the hub config has 0.0)."""
    diffusers = import_diffusers()
    config = {**HUB_CONFIG, "dropout": dropout}
    if paper_attention:
        config["up_block_types"] = MIRRORED_UP_BLOCKS
    return diffusers.UNet2DModel(**config)


@dataclass
class Side:
    """One contestant: what its step function needs, and its timings."""

    name: str
    loss_module: nn.Module  # (x, labels, t, noise) -> mean loss
    network: nn.Module
    optimizer: torch.optim.Optimizer
    ema_update: Callable[[], None]
    noise_stream: torch.Generator
    round_seconds: list[float]  # wall clock per round
    round_cpu_seconds: list[float]  # this process's CPU time per round (all its threads)

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.network.parameters())


def make_step(
    side: Side,
    diffusion: GaussianDiffusion,
    x: torch.Tensor,
    fast: FastPaths,
    device: torch.device,
    settings: TrainSettings,
) -> Callable[[], None]:
    """ddpm.tasks.benchmark's train_step for either side: batch on the device -> the trainer's UpdateStep (loss,
    gradients clipped, optimizer step skipped on the device when non-finite, EMA update)."""
    update = UpdateStep(
        side.loss_module,
        side.optimizer,
        side.ema_update,
        fast=fast,
        device=device,
        max_grad_norm=settings.max_grad_norm,
    )
    layout = memory_format(fast)
    batch = x.shape[0]

    def step() -> None:
        # Same generator seed on both sides: identical timesteps and noise at every step.
        t, noise = diffusion.training_noise(batch, device, side.noise_stream)
        update(x, None, t, noise.contiguous(memory_format=layout))

    return step


def flops_per_image(loss_module: nn.Module, diffusion: GaussianDiffusion, device: torch.device) -> float:
    """Training FLOPs (forward + backward) per image, counted eagerly on one image.

    Attention runs on the math backend here: the FLOP counter does not know every fused attention kernel (the CPU
    flash kernel, for one), so without this a side whose attention takes that kernel would seem to do less work."""
    x = torch.zeros(1, diffusion.channels, diffusion.image_size, diffusion.image_size, device=device)
    t, noise = diffusion.training_noise(1, device, torch.Generator(device).manual_seed(0))
    with sdpa_kernel(SDPBackend.MATH):
        flops = count_flops(lambda: loss_module(x, None, t, noise).backward())
    for p in loss_module.parameters():
        p.grad = None
    return flops


def time_rounds(
    sides: list[Side],
    steps: dict[str, Callable[[], None]],
    device: torch.device,
    *,
    rounds: int,
    steps_per_round: int,
    warmup: int,
    quiet: bool,
) -> None:
    """Warm-up, then rounds A B A B ...: each round runs `steps_per_round` steps of one side between two device
    drains, so no queued work of one side is billed to the other."""
    for side in sides:
        for _ in range(warmup):
            steps[side.name]()
        synchronize(device)
    for index in range(rounds):
        for side in sides:
            synchronize(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            for _ in range(steps_per_round):
                steps[side.name]()
            synchronize(device)
            side.round_seconds.append(time.perf_counter() - start)
            side.round_cpu_seconds.append(time.process_time() - cpu_start)
            if not quiet:
                wall, cpu = (t[-1] / steps_per_round * 1e3 for t in (side.round_seconds, side.round_cpu_seconds))
                print(
                    f"round {index + 1}/{rounds} {side.name:>9}: {wall:9.1f} ms/step (CPU time {cpu:9.1f} ms/step)",
                    flush=True,
                )


def profile_step(name: str, step: Callable[[], None], device: torch.device, rows: int = 20) -> str:
    """One step under torch.profiler: the operators that cost the most time of their own (not their children's)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        step()
        synchronize(device)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = profiler.key_averages().table(sort_by=sort_by, row_limit=rows)
    return f"--- {name}: top {rows} operators by {sort_by} (one step) ---\n{table}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import_diffusers()  # fail before minutes of set-up, not after
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cfg = compose_config(args)
    settings: TrainSettings = build_settings(cfg.trainer)
    if settings.use_labels:
        raise SystemExit("compare_diffusers.py compares the unconditional model: drop trainer.use_labels=true")
    device = resolve_device(settings.device)
    configure_backends(device, deterministic=False)
    fast = settings.fast_paths(device)
    load_before = os.getloadavg()

    # Ours: exactly what main.py trains.
    torch.manual_seed(settings.seed)
    diffusion = build_diffusion(cfg).to(device)
    ours = Side(
        "ours",
        diffusion,
        diffusion.model,
        build_optimizer(cfg, diffusion.model.parameters()),
        diffusion.update_ema,
        torch.Generator(device).manual_seed(settings.seed),
        [],
        [],
    )

    # diffusers: the same loss, optimizer node, EMA class and settings around a different network.
    torch.manual_seed(settings.seed)
    unet = build_diffusers_unet(float(cfg.model.dropout), args.attention == "paper").to(device)
    theirs_ema = (
        EMA(unet, decay=settings.ema_decay, start=settings.ema_start, update_rate=settings.ema_update_rate)
        if settings.use_ema
        else None
    )
    theirs = Side(
        "diffusers",
        DiffusersLoss(unet, diffusion).to(device),
        unet,
        build_optimizer(cfg, unet.parameters()),
        (lambda: theirs_ema.update(unet)) if theirs_ema is not None else (lambda: None),
        torch.Generator(device).manual_seed(settings.seed),
        [],
        [],
    )
    sides = [ours, theirs]

    if ours.parameters != theirs.parameters:
        raise SystemExit(
            f"parameter counts differ: ours {ours.parameters:,} vs diffusers {theirs.parameters:,}; "
            "the comparison would not be of the same model (check the model.* overrides)"
        )
    # FLOPs are a property of the architecture: counted eagerly, before channels_last and compile.
    flops = {side.name: flops_per_image(side.loss_module, diffusion, device) for side in sides}

    for network, ema in ((diffusion.model, diffusion.ema), (unet, theirs_ema)):
        prepare_network(network, fast)
        if ema is not None:
            prepare_network(ema.module, fast)  # as the trainer does (compiling is lazy: sampling never runs here)
    x = (
        torch.rand(
            args.batch_size,
            diffusion.channels,
            diffusion.image_size,
            diffusion.image_size,
            generator=torch.Generator().manual_seed(0),
        )
        * 2
        - 1
    ).to(device)
    x = x.contiguous(memory_format=memory_format(fast))
    for side in sides:
        side.network.train()
    steps = {side.name: make_step(side, diffusion, x, fast, device, settings) for side in sides}

    if not args.json:
        print(
            f"device {device_name(device)}; {fast.describe()}; optimizer "
            f"{type(ours.optimizer).__name__} fused={bool(ours.optimizer.defaults.get('fused'))}; "
            f"EMA {'on' if settings.use_ema else 'off'}; batch {args.batch_size}; load {load_before}"
        )
        print(
            f"parameters: ours {ours.parameters:,}, diffusers {theirs.parameters:,} "
            f"(ddpm.model.unet.UNet() defaults: {EXPECTED_PARAMETERS:,})"
        )
        print(f"training GFLOP/image: ours {flops['ours'] / 1e9:.3f}, diffusers {flops['diffusers'] / 1e9:.3f}")
    time_rounds(
        sides,
        steps,
        device,
        rounds=args.rounds,
        steps_per_round=args.steps_per_round,
        warmup=args.warmup,
        quiet=args.json,
    )

    result = summarize(args, sides, device, fast, settings, flops, load_before)
    if not args.json:
        print(format_summary(result))
    if args.profile:
        for side in sides:
            print(profile_step(side.name, steps[side.name], device))
    print(json.dumps(result))
    return result


def summarize(
    args: argparse.Namespace,
    sides: list[Side],
    device: torch.device,
    fast: FastPaths,
    settings: TrainSettings,
    flops: dict[str, float],
    load_before: tuple[float, ...],
) -> dict[str, Any]:
    """Everything a reader needs to judge the numbers, as one JSON-able dict."""
    per_step = {s.name: [r / args.steps_per_round for r in s.round_seconds] for s in sides}
    median_ms = {name: statistics.median(v) * 1e3 for name, v in per_step.items()}
    # CPU time is what the step costs this process, whatever else runs: on a shared CPU with --threads 1 it is
    # the steadier measure (with more threads it also counts threads spinning while a peer is descheduled).
    cpu_ms = {s.name: statistics.median(s.round_cpu_seconds) / args.steps_per_round * 1e3 for s in sides}
    ours, theirs = per_step["ours"], per_step["diffusers"]
    round_ratios = [b / a for a, b in zip(ours, theirs, strict=True)]
    return {
        "device": device_name(device),
        "host": platform.node(),
        "torch": torch.__version__,
        "diffusers": import_diffusers().__version__,
        "threads": torch.get_num_threads(),
        **vars(fast),
        "optimizer": type(sides[0].optimizer).__name__,
        "optimizer_fused": bool(sides[0].optimizer.defaults.get("fused")),
        "ema": settings.use_ema,
        "ema_decay": settings.ema_decay,
        "grad_clip": settings.grad_clip,
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "steps_per_round": args.steps_per_round,
        "warmup": args.warmup,
        "diffusers_attention": args.attention,
        "overrides": args.overrides,
        "parameters_ours": sides[0].parameters,
        "parameters_diffusers": sides[1].parameters,
        "train_gflop_per_image_ours": flops["ours"] / 1e9,
        "train_gflop_per_image_diffusers": flops["diffusers"] / 1e9,
        "ms_per_step_ours": median_ms["ours"],
        "ms_per_step_diffusers": median_ms["diffusers"],
        "images_per_s_ours": args.batch_size / median_ms["ours"] * 1e3,
        "images_per_s_diffusers": args.batch_size / median_ms["diffusers"] * 1e3,
        "ratio": median_ms["diffusers"] / median_ms["ours"],  # > 1: ours is faster
        "round_ratios": round_ratios,
        # Each round's ratio pairs two neighbouring rounds: steadier than the ratio of medians under shifting load.
        "ratio_median_of_rounds": statistics.median(round_ratios),
        "min_ms_per_step_ours": min(ours) * 1e3,
        "min_ms_per_step_diffusers": min(theirs) * 1e3,
        "round_ms_ours": [s * 1e3 for s in ours],
        "round_ms_diffusers": [s * 1e3 for s in theirs],
        "cpu_ms_per_step_ours": cpu_ms["ours"],
        "cpu_ms_per_step_diffusers": cpu_ms["diffusers"],
        "cpu_ratio": cpu_ms["diffusers"] / cpu_ms["ours"],
        "load_avg_before": list(load_before),
        "load_avg_after": list(os.getloadavg()),
    }


def format_summary(result: dict[str, Any]) -> str:
    rounds = " ".join(f"{r:.3f}" for r in result["round_ratios"])
    sides = [
        f"{name:<9} {result[f'ms_per_step_{name}']:10.1f} ms/step  {result[f'images_per_s_{name}']:9.2f} images/s "
        "(median)"
        for name in ("ours", "diffusers")
    ]
    return "\n".join(
        [
            *sides,
            (
                f"ratio (diffusers time / our time, > 1 = ours faster): {result['ratio']:.3f}x; per round: {rounds} "
                f"(median {result['ratio_median_of_rounds']:.3f}x)"
            ),
            (
                f"CPU time: ours {result['cpu_ms_per_step_ours']:.1f} ms/step, diffusers "
                f"{result['cpu_ms_per_step_diffusers']:.1f} ms/step (median), ratio {result['cpu_ratio']:.3f}x"
            ),
            f"load average before {result['load_avg_before']}, after {result['load_avg_after']}",
        ]
    )


def user_error(error: BaseException | None) -> UserError | None:
    """The project's own error behind `error` (Hydra's instantiate wraps it), as main.py reports them."""
    while error is not None and not isinstance(error, UserError):
        error = error.__cause__
    return error


if __name__ == "__main__":
    try:
        main()
    except Exception as failure:
        if (expected := user_error(failure)) is None:
            raise
        raise SystemExit(f"compare_diffusers.py: {expected}") from None
