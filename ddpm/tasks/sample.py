"""task=sample: images from a trained checkpoint, as PNG files and a guided-diffusion style samples.npz."""

import logging
import math
import sys
from pathlib import Path

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

from ddpm.build import build_sampler, load_diffusion
from ddpm.configs import describe, differences
from ddpm.errors import ConfigError
from ddpm.images import save_images, save_sequence_strip, to_uint8
from ddpm.fast_paths import prepare_for_sampling
from ddpm.training import resolve_device

log = logging.getLogger(__name__)


def balanced_labels(num_images: int, classes: list[int]) -> torch.Tensor:
    """An equal share of images per class (1000 images, 10 classes -> 100 each), in the order given."""
    return torch.tensor(classes).repeat_interleave(math.ceil(num_images / len(classes)))[:num_images]


def check_settings(cfg: DictConfig) -> None:
    if cfg.checkpoint is None:
        raise ConfigError("task=sample needs checkpoint=PATH (e.g. outputs/runs/.../checkpoints/last.pt)")
    for key in ("num_images", "batch_size", "sequence_frames"):
        value = cfg.sample[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"sample.{key}={value!r} must be an integer >= 1")
    labels = cfg.sample.labels
    if labels is not None and (
        not OmegaConf.is_list(labels) or not labels or not all(isinstance(v, int) and not isinstance(v, bool) for v in labels)
    ):
        raise ConfigError(f"sample.labels={labels!r} must be null (every class) or a list of class indices, e.g. [3, 7]")


def chosen_classes(cfg: DictConfig, num_classes: int | None, checkpoint: str) -> list[int] | None:
    """The classes to draw: sample.labels, or every class of a conditional checkpoint, or None."""
    wanted = cfg.sample.labels
    if wanted is None:
        return list(range(num_classes)) if num_classes else None
    if not num_classes:
        raise ConfigError(
            f"sample.labels={list(wanted)} asks for classes, but checkpoint={checkpoint} was trained without labels "
            "(trainer.use_labels=false); drop sample.labels or use a class-conditional checkpoint"
        )
    outside = [v for v in wanted if not 0 <= v < num_classes]
    if outside:
        raise ConfigError(f"sample.labels={list(wanted)}: {outside} not in 0..{num_classes - 1}, the checkpoint's classes")
    return list(wanted)


def check_overrides_match(cfg: DictConfig, checkpoint_config: dict, checkpoint: str) -> None:
    """task=sample builds the network from the checkpoint's config; a model/schedule/diffusion given on the
    command line that differs from it is an error, not something to ignore silently."""
    overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
    requested = OmegaConf.to_container(cfg, resolve=True)
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        section = key.split(".")[0].split("@")[0]
        if section not in ("model", "schedule", "diffusion"):
            continue
        changes = [c for c in differences(checkpoint_config, requested, (section,)) if c[0].startswith(key)]
        if changes:
            name, old, new = changes[0]
            raise ConfigError(
                f"{name}={new!r} was given, but checkpoint={checkpoint} holds a model with {name}={old!r} "
                f"({describe(changes)}). task=sample builds the model from the checkpoint: drop {override}."
            )


def run(cfg: DictConfig) -> dict:
    """checkpoint -> diffusion (EMA weights) -> sampler -> batches of images -> PNG files and samples.npz."""
    check_settings(cfg)
    settings = cfg.sample
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    out_dir = Path(to_absolute_path(settings.out_dir)) if settings.out_dir else run_dir / "samples"
    device = resolve_device(settings.device, key="sample.device")

    diffusion, state = load_diffusion(to_absolute_path(cfg.checkpoint), device)
    check_overrides_match(cfg, state["config"], cfg.checkpoint)
    precision = prepare_for_sampling(diffusion, device=device, precision=settings.precision, compile=settings.compile,
                                     key="sample")  # fmt: skip
    classes = chosen_classes(cfg, diffusion.model.num_classes, cfg.checkpoint)
    sampler, guidance_scale = build_sampler(cfg.sampler)
    labels = balanced_labels(settings.num_images, classes) if classes else None
    log.info("sampling %d images from %s (step %d, %s weights) into %s", settings.num_images, cfg.checkpoint,
             state["step"], "EMA" if settings.use_ema and diffusion.ema else "raw", out_dir)  # fmt: skip

    generator = torch.Generator(device).manual_seed(settings.seed)
    batches = []
    for start in range(0, settings.num_images, settings.batch_size):
        count = min(settings.batch_size, settings.num_images - start)
        batch_labels = labels[start : start + count] if labels is not None else None
        images = diffusion.sample(
            count, device, batch_labels.to(device) if batch_labels is not None else None,
            use_ema=settings.use_ema, generator=generator, sampler=sampler, progress=sys.stderr.isatty(),
            guidance_scale=guidance_scale, precision=precision,
        )  # fmt: skip
        pixels = to_uint8(images)
        save_images(pixels, out_dir, batch_labels.numpy() if batch_labels is not None else None, start=start)
        batches.append(pixels)
        log.info("%d/%d images", start + count, settings.num_images)

    arrays = {"arr_0": np.concatenate(batches)}
    if labels is not None:
        arrays["arr_1"] = labels.numpy()
    np.savez(out_dir / "samples.npz", **arrays)
    result = {"out_dir": str(out_dir), "npz": str(out_dir / "samples.npz"), "shape": list(arrays["arr_0"].shape)}

    if settings.sequence:
        count = min(settings.num_images, 8)
        sequence_labels = labels[:count].to(device) if labels is not None else None
        sequence = diffusion.sample_diffusion_sequence(count, device, sequence_labels, use_ema=settings.use_ema,
                                                       generator=torch.Generator(device).manual_seed(settings.seed))
        result["sequence"] = str(save_sequence_strip(sequence, out_dir / "sequence.png", settings.sequence_frames))
    log.info("wrote %s", result)
    return result
