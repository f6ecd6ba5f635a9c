"""task=evaluate: FID, Inception Score and precision/recall of a checkpoint's samples, against the training set.

    python main.py task=evaluate checkpoint=PATH eval.num_samples=50000 sampler=ddpm
    python main.py task=evaluate eval.samples=PATH.npz                     # evaluate existing samples
    python main.py -m task=evaluate checkpoint=PATH eval.num_shards=4 eval.shard=0,1,2,3
    python main.py task=evaluate eval.merge=SWEEP_DIR                      # ... then merge the shards
    python main.py task=evaluate checkpoint=PATH eval.nfe_sweep=[10,20,50,100,1000]

Image i is drawn from its own seed (eval.seed, i) and gets class i mod C when the checkpoint is class-conditional
(ddpm.generation). A shard is a contiguous range of whole batches of eval.batch_size, so the shards of a sharded
run hold exactly the images of the unsharded run (on the same kind of device).
"""

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

from ddpm.build import build_sampler, load_diffusion
from ddpm.devices import resolve_device
from ddpm.diffusion import GaussianDiffusion
from ddpm.errors import ConfigError
from ddpm.evaluation.nfe_sweep import CountingSampler, sweep_points, sweep_sampler, write_sweep_table
from ddpm.evaluation.reference import reference_statistics
from ddpm.evaluation.samples import merge_shards, read_samples, save_npz, shard_name
from ddpm.evaluation.scores import image_metrics
from ddpm.evaluation.settings import EvalSettings, FidSettings
from ddpm.fast_paths import prepare_for_sampling
from ddpm.generation import as_arrays, class_labels, draw_images
from ddpm.validation import build_settings

log = logging.getLogger(__name__)


def check_settings(cfg: DictConfig) -> EvalSettings:
    """Every eval.* value, and a source of samples, before anything slow happens; errors name the key."""
    settings: EvalSettings = build_settings(cfg.eval)
    if not (settings.samples or settings.merge) and not cfg.checkpoint:
        raise ConfigError("task=evaluate needs checkpoint=PATH (to draw samples), eval.samples=PATH.npz or "
                          "eval.merge=SHARD_DIR")  # fmt: skip
    return settings


def training_dataset(cfg: DictConfig, checkpoint_config: dict, checkpoint: str) -> DictConfig:
    """The data to compare the samples with: the checkpoint's training data, unless the command line names a
    dataset, which must then be that data (FID against other data is a silent mistake)."""
    overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
    named = any(o.lstrip("+~").split("=")[0].split(".")[0] == "dataset" for o in overrides)
    trained = checkpoint_config.get("dataset", {})
    if not named and trained.get("_target_") != cfg.dataset.get("_target_"):
        log.info("comparing with the checkpoint's training data (dataset %s)", trained.get("_target_"))
        return OmegaConf.create(trained)
    check_dataset_matches(cfg, checkpoint_config, checkpoint)
    return cfg.dataset


def check_dataset_matches(cfg: DictConfig, checkpoint_config: dict, checkpoint: str) -> None:
    """FID against another dataset than the training one is a silent mistake: refuse it."""
    trained = checkpoint_config.get("dataset", {})
    for key in ("_target_", "image_size"):
        if trained.get(key) != cfg.dataset.get(key):
            raise ConfigError(
                f"dataset.{key}={cfg.dataset.get(key)!r}, but checkpoint={checkpoint} was trained with "
                f"dataset.{key}={trained.get(key)!r}: pass the training dataset (e.g. dataset=digits) to compare with it"
            )


def generate(diffusion: GaussianDiffusion, sampler, settings: EvalSettings, images: range, device: torch.device, *,
             guidance_scale: float, precision: str) -> dict[str, np.ndarray]:  # fmt: skip
    """The images with indices `images` (uint8 N x H x W x C) and, when conditional, their classes."""
    labels = class_labels(settings.num_samples, diffusion.model.num_classes)
    return as_arrays(draw_images(diffusion, sampler, images=images, batch_size=settings.batch_size, seed=settings.seed,
                                 device=device, labels=labels, use_ema=settings.use_ema, guidance_scale=guidance_scale,
                                 precision=precision))  # fmt: skip


def metrics_of(images: np.ndarray, settings: EvalSettings, fid: FidSettings, extractor, reference, device) -> dict:
    return image_metrics(images, extractor, reference, feature_batch_size=fid.batch_size,
                         is_splits=settings.is_splits, pr_k=settings.pr_k, device=device,
                         pr_num_samples=settings.pr_num_samples if settings.precision_recall else None)  # fmt: skip


def write_json(path: Path, content: dict) -> Path:
    path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
    return path


def default_shard_dir() -> Path:
    """The sweep directory in a multirun (shared by its jobs), else the run directory."""
    hydra = HydraConfig.get()
    return Path(hydra.sweep.dir) if hydra.mode == RunMode.MULTIRUN else Path(hydra.runtime.output_dir)


def run(cfg: DictConfig) -> dict:
    """Samples (drawn, read or merged) -> features -> metrics.json; or one shard's samples; or the NFE sweep."""
    settings = check_settings(cfg)
    fid: FidSettings = build_settings(cfg.fid)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(settings.device, key="eval.device")

    # The source of the samples first: a bad file or checkpoint fails in seconds.
    source: dict[str, Any] = {}
    dataset, images, arrays = cfg.dataset, None, None
    if settings.merge:
        arrays, meta = merge_shards(settings.merge)
        images, source = arrays["arr_0"], {"merged_from": str(to_absolute_path(settings.merge)), **meta}
    elif settings.samples:
        images, source = read_samples(settings.samples), {"samples": str(to_absolute_path(settings.samples))}
    else:
        diffusion, state = load_diffusion(to_absolute_path(cfg.checkpoint), device, trust=cfg.trust_checkpoint)
        dataset = training_dataset(cfg, state["config"], cfg.checkpoint)
        precision = prepare_for_sampling(diffusion, device=device, precision=settings.precision,
                                         compile=settings.compile, key="eval")  # fmt: skip
        sampler, guidance_scale = build_sampler(cfg.sampler, diffusion.betas)
    if settings.num_shards == 1:
        # Before drawing anything: missing Inception weights or data fail in seconds, not after hours of sampling.
        extractor = fid.build_extractor(device)
        reference = reference_statistics(fid, dataset, cfg.paths.data_dir, extractor)

    if images is None:
        if settings.nfe_sweep is not None:
            return run_sweep(cfg, settings, fid, diffusion, extractor, reference, device, run_dir, precision)
        source = {"checkpoint": cfg.checkpoint, "step": state["step"], "seed": settings.seed,
                  "num_samples": settings.num_samples, "batch_size": settings.batch_size, "use_ema": settings.use_ema,
                  "sampler": OmegaConf.to_container(cfg.sampler, resolve=True)}  # fmt: skip
        arrays = generate(diffusion, sampler, settings, settings.shard_images(), device,
                          guidance_scale=guidance_scale, precision=precision)  # fmt: skip
        if settings.num_shards > 1:  # metrics of a part would mislead: they come from eval.merge
            shard_dir = Path(to_absolute_path(settings.shard_dir)) if settings.shard_dir else default_shard_dir()
            path = save_npz(shard_dir / shard_name(settings.shard, settings.num_shards), arrays,
                            {**source, "shard": settings.shard})  # fmt: skip
            log.info("wrote %s (%d images); merge with task=evaluate eval.merge=%s", path, len(arrays["arr_0"]), shard_dir)
            return {"shard": str(path), "count": len(arrays["arr_0"])}
        images = arrays["arr_0"]
    if arrays is not None:
        save_npz(run_dir / "samples.npz", arrays)

    result = {**metrics_of(images, settings, fid, extractor, reference, device), **source}
    write_json(run_dir / "metrics.json", result)
    log.info("FID %.3f, IS %.3f +- %.3f (%d samples) -> %s", result["fid"], result["inception_score"],
             result["inception_score_std"], result["num_samples"], run_dir / "metrics.json")  # fmt: skip
    return result


def run_sweep(cfg: DictConfig, settings: EvalSettings, fid: FidSettings, diffusion: GaussianDiffusion, extractor,
              reference, device: torch.device, run_dir: Path, precision: str) -> dict:  # fmt: skip
    """Every (sampler, steps) point of the sweep on the same images' seeds: its NFE and metrics."""
    images = range(settings.num_samples)
    _, guidance_scale = build_sampler(cfg.sampler)  # guidance, when the sampler node sets it, applies to every point
    rows = []
    for name, steps in sweep_points(settings.nfe_samplers, settings.nfe_sweep, diffusion.num_timesteps):
        sampler = CountingSampler(sweep_sampler(name, steps))
        pixels = generate(diffusion, sampler, settings, images, device, guidance_scale=guidance_scale,
                          precision=precision)["arr_0"]  # fmt: skip
        metrics = metrics_of(pixels, settings, fid, extractor, reference, device)
        nfe = sampler.calls / settings.num_batches  # per image batch: what one image costs
        rows.append({"sampler": name, "steps": steps or diffusion.num_timesteps, "nfe": int(round(nfe)), **metrics})
        log.info("%s, %s steps: NFE %d, FID %.3f", name, rows[-1]["steps"], rows[-1]["nfe"], metrics["fid"])
    files = write_sweep_table(rows, run_dir)
    result = {"nfe_sweep": rows, "checkpoint": cfg.checkpoint, "seed": settings.seed, "guidance_scale": guidance_scale,
              "files": [str(f) for f in files]}  # fmt: skip
    write_json(run_dir / "metrics.json", result)
    return result
