"""task=sample: images from a trained checkpoint, as PNG files and a guided-diffusion style samples.npz."""

import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import to_absolute_path
from omegaconf import DictConfig

from ddpm.config.errors import ConfigError
from ddpm.config.validation import Validated, at_least, build_settings, seed_value
from ddpm.diffusion.build import build_sampler, check_overrides_match, load_diffusion
from ddpm.diffusion.generation import ImageBatch, as_arrays, balanced_labels, draw_images
from ddpm.evaluation.protocol import drawing_record
from ddpm.evaluation.samples import save_npz
from ddpm.io.images import save_images, save_sequence_strip
from ddpm.runtime.devices import configure_backends, resolve_device
from ddpm.runtime.fast_paths import prepare_for_sampling
from ddpm.runtime.output_folder import OutputFolder
from ddpm.training.preemption import stop_signals_end_at_once

log = logging.getLogger(__name__)


@dataclasses.dataclass
class SampleSettings(Validated):
    """The `sample` node of conf/task/sample.yaml."""

    SECTION: ClassVar[str] = "sample"

    num_images: int = at_least(1, 1000)
    batch_size: int = at_least(1, 250)
    seed: int = seed_value()
    out_dir: str | None = None
    replace: bool = False  # an out_dir holding an earlier command's outputs: move them aside (else refused)
    use_ema: bool = True
    labels: list[int] | None = None
    device: str = "auto"
    sequence: bool = False
    sequence_frames: int = at_least(1, 10)
    precision: str = "auto"
    compile: bool | None = None

    def check(self) -> None:
        if self.labels is not None and not self.labels:
            raise ConfigError("sample.labels=[] must be null (every class) or a list of class indices, e.g. [3, 7]")


def check_settings(cfg: DictConfig) -> SampleSettings:
    if not cfg.checkpoint:  # null, or `checkpoint=` with nothing after it
        raise ConfigError("task=sample needs checkpoint=PATH (e.g. outputs/runs/.../checkpoints/last.pt)")
    return build_settings(cfg.sample)


def chosen_classes(wanted: list[int] | None, num_classes: int | None, checkpoint: str) -> list[int] | None:
    """The classes to draw: sample.labels, or every class of a conditional checkpoint, or None."""
    if wanted is None:
        return list(range(num_classes)) if num_classes else None
    if not num_classes:
        raise ConfigError(
            f"sample.labels={list(wanted)} asks for classes, but checkpoint={checkpoint} was trained without labels "
            "(trainer.use_labels=false); drop sample.labels or use a class-conditional checkpoint"
        )
    outside = [v for v in wanted if not 0 <= v < num_classes]
    if outside:
        raise ConfigError(
            f"sample.labels={list(wanted)}: {outside} not in 0..{num_classes - 1}, the checkpoint's classes"
        )
    return list(wanted)


def saved_as_pngs(batches: Iterator[ImageBatch], out_dir: Path, total: int) -> Iterator[ImageBatch]:
    """Passes the batches on, each saved as numbered PNG files first."""
    for batch in batches:
        save_images(
            batch.pixels, out_dir, batch.labels.numpy() if batch.labels is not None else None, start=batch.start
        )
        log.info("%d/%d images", batch.start + len(batch.pixels), total)
        yield batch


def run(cfg: DictConfig) -> dict:
    """checkpoint -> diffusion (EMA weights) -> sampler -> batches of images -> PNG files and samples.npz.

    The files go into a staging folder and are moved into sample.out_dir when every one is written: the folder
    holds one command's images, whole, or stays as it was (after a fault, or a stop signal, which ends the
    command at once)."""
    settings = check_settings(cfg)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    out_dir = Path(to_absolute_path(settings.out_dir)) if settings.out_dir else run_dir / "samples"
    device = resolve_device(settings.device, key="sample.device")
    configure_backends(device, deterministic=False)  # TF32 and cuDNN's autotuner, as training has them
    outputs = OutputFolder(out_dir, "sample.out_dir", replace=settings.replace, replace_key="sample.replace")
    try:
        with stop_signals_end_at_once(f"while sampling: stopping now; sample.out_dir={out_dir} is as it was"):
            diffusion, state = load_diffusion(to_absolute_path(cfg.checkpoint), device, trust=cfg.trust_checkpoint)
            check_overrides_match(cfg, state["config"], cfg.checkpoint, task="sample")
            precision = prepare_for_sampling(
                diffusion, device=device, precision=settings.precision, compile=settings.compile, key="sample"
            )
            classes = chosen_classes(settings.labels, diffusion.model.num_classes, cfg.checkpoint)
            sampler, guidance_scale = build_sampler(cfg.sampler, diffusion.betas)
            labels = balanced_labels(settings.num_images, classes) if classes else None
            log.info(
                "sampling %d images from %s (step %d, %s weights) into %s",
                settings.num_images,
                cfg.checkpoint,
                state["step"],
                "EMA" if settings.use_ema and diffusion.ema else "raw",
                out_dir,
            )
            shape = draw_into(
                outputs.staging, settings, cfg, diffusion, state, sampler, guidance_scale, labels, precision
            )
            outputs.publish(last="samples.npz")
    finally:
        outputs.discard()
    result = {"out_dir": str(out_dir), "npz": str(out_dir / "samples.npz"), "shape": shape}
    if settings.sequence:
        result["sequence"] = str(out_dir / "sequence.png")
    log.info("wrote %s", result)
    return result


def draw_into(
    folder: Path,
    settings: SampleSettings,
    cfg: DictConfig,
    diffusion,
    state: dict,
    sampler,
    guidance_scale: float,
    labels: torch.Tensor | None,
    precision: str,
) -> list[int]:
    """The images as numbered PNG files and samples.npz (and the denoising strip, sample.sequence) in `folder`;
    returns the images' array shape."""
    device = next(diffusion.parameters()).device
    batches = draw_images(
        diffusion,
        sampler,
        images=range(settings.num_images),
        batch_size=settings.batch_size,
        seed=settings.seed,
        device=device,
        labels=labels,
        use_ema=settings.use_ema,
        guidance_scale=guidance_scale,
        precision=precision,
    )
    arrays = as_arrays(saved_as_pngs(batches, folder, settings.num_images))
    record = drawing_record(
        checkpoint=cfg.checkpoint,
        state=state,
        sampler_node=cfg.sampler,
        num_timesteps=diffusion.num_timesteps,
        ema_used=settings.use_ema and diffusion.ema is not None,
        seed=settings.seed,
        precision=precision,
    )
    save_npz(folder / "samples.npz", arrays, record)
    if settings.sequence:
        count = min(settings.num_images, 8)
        sequence_labels = labels[:count].to(device) if labels is not None else None
        sequence = diffusion.sample_diffusion_sequence(
            count,
            device,
            sequence_labels,
            use_ema=settings.use_ema,
            generator=torch.Generator(device).manual_seed(settings.seed),
        )
        save_sequence_strip(sequence, folder / "sequence.png", settings.sequence_frames)
    return list(arrays["arr_0"].shape)
