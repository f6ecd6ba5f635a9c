"""task=sample: images from a trained checkpoint, as PNG files and a guided-diffusion style samples.npz."""

import logging
import math
import sys
from pathlib import Path

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate, to_absolute_path
from omegaconf import DictConfig

from ddpm.build import load_diffusion
from ddpm.errors import ConfigError
from ddpm.images import save_images, save_sequence_strip, to_uint8
from ddpm.training import resolve_device

log = logging.getLogger(__name__)


def balanced_labels(num_images: int, num_classes: int) -> torch.Tensor:
    """An equal share of images per class (1000 images, 10 classes -> 100 each), sorted by class."""
    return torch.arange(num_classes).repeat_interleave(math.ceil(num_images / num_classes))[:num_images]


def check_settings(cfg: DictConfig) -> None:
    if cfg.checkpoint is None:
        raise ConfigError("task=sample needs checkpoint=PATH (e.g. outputs/runs/.../checkpoints/last.pt)")
    for key in ("num_images", "batch_size", "sequence_frames"):
        value = cfg.sample[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"sample.{key}={value!r} must be an integer >= 1")


def run(cfg: DictConfig) -> dict:
    """checkpoint -> diffusion (EMA weights) -> sampler -> batches of images -> PNG files and samples.npz."""
    check_settings(cfg)
    settings = cfg.sample
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    out_dir = Path(to_absolute_path(settings.out_dir)) if settings.out_dir else run_dir / "samples"
    device = resolve_device(settings.device)

    diffusion, state = load_diffusion(to_absolute_path(cfg.checkpoint), device)
    sampler = instantiate(cfg.sampler)
    num_classes = diffusion.model.num_classes
    labels = balanced_labels(settings.num_images, num_classes) if num_classes else None
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
