"""task=evaluate: FID, KID, precision/recall and, where the feature network has a classifier, the Inception Score
of a checkpoint's samples against a split of its training data, with the protocol of the numbers (metrics.json).

    python main.py task=evaluate checkpoint=PATH eval.num_samples=50000 sampler=ddpm
    python main.py task=evaluate eval.samples=PATH.npz                     # existing samples (task=sample's npz: its data)
    python main.py -m task=evaluate checkpoint=PATH eval.num_shards=4 eval.shard=0,1,2,3
    python main.py task=evaluate eval.merge=SWEEP_DIR                      # ... then merge the shards
    python main.py task=evaluate checkpoint=PATH eval.nfe_sweep=[10,20,50,100,1000]
    python main.py task=evaluate checkpoint=PATH eval.nll=true eval.fid=false  # bits/dim on the test split

Image i is drawn from its own seed (eval.seed, i) and gets class i mod C when the checkpoint is class-conditional
(ddpm.generation). A shard is a contiguous range of whole batches of eval.batch_size, so the shards of a sharded
run hold exactly the images of the unsharded run (on the same kind of device).
"""

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate, to_absolute_path
from omegaconf import DictConfig, OmegaConf

from ddpm.build import build_sampler, load_diffusion
from ddpm.data.loader import evaluation_batches
from ddpm.devices import resolve_device
from ddpm.diffusion import GaussianDiffusion
from ddpm.errors import ConfigError
from ddpm.evaluation.likelihood import test_set_nll
from ddpm.evaluation.nfe_sweep import CountingSampler, sweep_points, sweep_sampler, write_sweep_table
from ddpm.evaluation.protocol import (
    drawing_record,
    evaluation_protocol,
    generation_protocol,
    protocol_lines,
    summary,
)
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


def training_dataset(cfg: DictConfig, trained: dict | None, source: str) -> DictConfig:
    """The data to compare the samples with: the training data of the checkpoint they come from (`trained`,
    its dataset config; None when unknown), unless the command line names a dataset, which must then be that
    data (FID against other data is a silent mistake). `source` names where the samples come from."""
    overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
    named = any(o.lstrip("+~").split("=")[0].split(".")[0] == "dataset" for o in overrides)
    if trained is None:
        return cfg.dataset
    if not named and trained.get("_target_") != cfg.dataset.get("_target_"):
        log.info("comparing with the training data of %s (dataset %s)", source, trained.get("_target_"))
        return OmegaConf.create(trained)
    for key in ("_target_", "image_size"):
        if trained.get(key) != cfg.dataset.get(key):
            raise ConfigError(
                f"dataset.{key}={cfg.dataset.get(key)!r}, but {source} was trained with "
                f"dataset.{key}={trained.get(key)!r}: pass the training dataset (e.g. dataset=digits) to compare with it"
            )
    return cfg.dataset


def generate(diffusion: GaussianDiffusion, sampler, settings: EvalSettings, images: range, device: torch.device, *,
             seed: int, guidance_scale: float, precision: str) -> dict[str, np.ndarray]:  # fmt: skip
    """The images with indices `images` (uint8 N x H x W x C) and, when conditional, their classes; every
    index is drawn, the last partial batch too."""
    labels = class_labels(settings.num_samples, diffusion.model.num_classes)
    arrays = as_arrays(draw_images(diffusion, sampler, images=images, batch_size=settings.batch_size, seed=seed,
                                   device=device, labels=labels, use_ema=settings.use_ema,
                                   guidance_scale=guidance_scale, precision=precision))  # fmt: skip
    if len(arrays["arr_0"]) != len(images):
        raise RuntimeError(f"drew {len(arrays['arr_0'])} images where {len(images)} were asked for")
    return arrays


def metrics_of(images: np.ndarray, settings: EvalSettings, fid: FidSettings, extractor, reference, device) -> dict:
    return image_metrics(images, extractor, reference, feature_batch_size=fid.batch_size,
                         is_splits=settings.is_splits, pr_k=settings.pr_k, device=device,
                         pr_num_samples=settings.pr_num_samples if settings.precision_recall else None,
                         kid_subsets=settings.kid_subsets if settings.kid else None,
                         kid_subset_size=settings.kid_subset_size)  # fmt: skip


def across_seeds(per_seed: dict[int, dict]) -> dict:
    """One seed's metrics as they are; several seeds': FID as the minimum (EDM's convention), with the mean
    and the standard deviation (ddof=1), the other metrics as means, and every seed's metrics."""
    first = next(iter(per_seed.values()))
    if len(per_seed) == 1:
        return dict(first)
    fids = np.array([metrics["fid"] for metrics in per_seed.values()])
    result = {key: (float(np.mean([metrics[key] for metrics in per_seed.values()]))
                    if isinstance(value, float) else value) for key, value in first.items()}  # fmt: skip
    result.update(fid=float(fids.min()), fid_mean=float(fids.mean()), fid_std=float(fids.std(ddof=1)),
                  fid_per_seed={str(seed): metrics["fid"] for seed, metrics in per_seed.items()},
                  per_seed={str(seed): metrics for seed, metrics in per_seed.items()})  # fmt: skip
    return result


def write_json(path: Path, content: dict) -> Path:
    path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
    return path


def default_shard_dir() -> Path:
    """The sweep directory in a multirun (shared by its jobs), else the run directory."""
    hydra = HydraConfig.get()
    return Path(hydra.sweep.dir) if hydra.mode == RunMode.MULTIRUN else Path(hydra.runtime.output_dir)


def run(cfg: DictConfig) -> float:
    """task=evaluate (`evaluate`), returning its objective to a sweeper: the FID (the minimum over eval.seeds),
    or the bits/dim with eval.fid=false; NaN for a shard or an NFE sweep, which have no one number."""
    result = evaluate(cfg)
    if "fid" in result:
        return float(result["fid"])
    if (result.get("nll") or {}).get("bits_per_dim") is not None:
        return float(result["nll"]["bits_per_dim"])
    return float("nan")


def evaluate(cfg: DictConfig) -> dict:
    """Samples (drawn per seed, read or merged) -> features -> metrics.json with the protocol; or one shard's
    samples; or the NFE sweep."""
    settings = check_settings(cfg)
    fid: FidSettings = build_settings(cfg.fid)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(settings.device, key="eval.device")

    # The source of the samples first: a bad file or checkpoint fails in seconds.
    dataset, images, record, source = cfg.dataset, None, None, {}
    if settings.merge:
        arrays, record = merge_shards(settings.merge)
        images, source = arrays["arr_0"], {"merged_from": str(to_absolute_path(settings.merge))}
        save_npz(run_dir / "samples.npz", arrays, record)  # the whole set, as an unsharded run writes it
        dataset = training_dataset(cfg, record.get("dataset"), f"eval.merge={settings.merge} (from {record.get('checkpoint')})")
    elif settings.samples:
        images, record = read_samples(settings.samples)
        source = {"samples": str(to_absolute_path(settings.samples))}
        if record:
            dataset = training_dataset(cfg, record.get("dataset"),
                                       f"eval.samples={settings.samples} (from {record.get('checkpoint')})")  # fmt: skip
    else:
        diffusion, state = load_diffusion(to_absolute_path(cfg.checkpoint), device, trust=cfg.trust_checkpoint)
        dataset = training_dataset(cfg, state["config"].get("dataset", {}), f"checkpoint={cfg.checkpoint}")
        nll = likelihood(diffusion, state, dataset, settings, device) if settings.nll else None
        if not settings.fid:
            result = {"nll": nll, "protocol": {"checkpoint": str(cfg.checkpoint), "step": state.get("step"),
                                               "dataset": OmegaConf.to_container(dataset, resolve=True)}}  # fmt: skip
            write_json(run_dir / "metrics.json", result)
            log.info("-> %s", run_dir / "metrics.json")
            return result
        precision = prepare_for_sampling(diffusion, device=device, precision=settings.precision,
                                         compile=settings.compile, key="eval")  # fmt: skip
        sampler, guidance_scale = build_sampler(cfg.sampler, diffusion.betas)
        records = {seed: drawing_record(checkpoint=cfg.checkpoint, state=state, sampler_node=cfg.sampler,
                                        num_timesteps=diffusion.num_timesteps, seed=seed, precision=precision,
                                        ema_used=settings.use_ema and diffusion.ema is not None)
                   for seed in settings.seeds_to_draw}  # fmt: skip
    if settings.num_shards == 1:
        # Before drawing anything: missing Inception weights or data fail in seconds, not after hours of sampling.
        extractor = fid.build_extractor(device)
        reference = reference_statistics(fid, dataset, cfg.paths.data_dir, extractor)

    if images is not None:
        per_seed = {(record or {}).get("seed"): metrics_of(images, settings, fid, extractor, reference, device)}
    elif settings.nfe_sweep is not None:
        return run_sweep(cfg, settings, fid, diffusion, extractor, reference, device, run_dir, precision, state)
    elif settings.num_shards > 1:  # metrics of a part would mislead: they come from eval.merge
        seed = settings.seeds_to_draw[0]
        arrays = generate(diffusion, sampler, settings, settings.shard_images(), device, seed=seed,
                          guidance_scale=guidance_scale, precision=precision)  # fmt: skip
        shard_dir = Path(to_absolute_path(settings.shard_dir)) if settings.shard_dir else default_shard_dir()
        meta = {**records[seed], "num_samples": settings.num_samples, "batch_size": settings.batch_size,
                "shard": settings.shard}  # fmt: skip
        path = save_npz(shard_dir / shard_name(settings.shard, settings.num_shards), arrays, meta)
        log.info("wrote %s (%d images); merge with task=evaluate eval.merge=%s", path, len(arrays["arr_0"]), shard_dir)
        return {"shard": str(path), "count": len(arrays["arr_0"])}
    else:
        per_seed = {}
        for seed in settings.seeds_to_draw:
            arrays = generate(diffusion, sampler, settings, range(settings.num_samples), device, seed=seed,
                              guidance_scale=guidance_scale, precision=precision)  # fmt: skip
            name = "samples.npz" if len(records) == 1 else f"samples_seed{seed}.npz"
            save_npz(run_dir / name, arrays, records[seed])
            per_seed[seed] = metrics_of(arrays["arr_0"], settings, fid, extractor, reference, device)
            if len(records) > 1:
                log.info("seed %d: FID %.4f", seed, per_seed[seed]["fid"])
        record = records[settings.seeds_to_draw[0]]

    result = across_seeds(per_seed)
    if images is None and settings.nll:
        result["nll"] = nll
    generated = generation_protocol(result["num_samples"], record, list(per_seed) if images is None else None, source)
    result["protocol"] = evaluation_protocol(extractor, reference, generated)
    write_json(run_dir / "metrics.json", result)
    for line in summary(result):
        log.info(line)
    log.info("-> %s", run_dir / "metrics.json")
    return result


def likelihood(diffusion: GaussianDiffusion, state: dict, dataset: DictConfig, settings: EvalSettings,
               device: torch.device) -> dict:  # fmt: skip
    """The variational bound in bits/dim on the test split of the checkpoint's data, logged per term."""
    test_set = instantiate(dataset, split="test")
    if test_set is None:
        raise ConfigError(f"eval.nll=true needs a test split, and dataset {dataset.get('_target_')} has none")
    use_labels = bool(OmegaConf.select(OmegaConf.create(state["config"]), "trainer.use_labels", default=False))
    batches = evaluation_batches(test_set, settings.batch_size, num_workers=0)
    nll = test_set_nll(diffusion, batches, device=device, use_labels=use_labels, timesteps=settings.nll_timesteps,
                       num_images=settings.nll_num_images, use_ema=settings.use_ema, seed=settings.seed)  # fmt: skip
    log.info("NLL %.4f bits/dim on %d test images (L_T %.4f + KL %.4f + L_0 %.4f)%s", nll["bits_per_dim"],
             nll["num_images"], nll["prior_bits_per_dim"], nll["kl_bits_per_dim"], nll["decoder_bits_per_dim"],
             "" if nll["exact"] else f"; {nll['note']}")  # fmt: skip
    return nll


def run_sweep(cfg: DictConfig, settings: EvalSettings, fid: FidSettings, diffusion: GaussianDiffusion, extractor,
              reference, device: torch.device, run_dir: Path, precision: str, state: dict) -> dict:  # fmt: skip
    """Every (sampler, steps) point of the sweep on the same images' seeds: its NFE, sampling time per image
    and metrics, all under one protocol (recorded with the table)."""
    images, seed = range(settings.num_samples), settings.seeds_to_draw[0]
    _, guidance_scale = build_sampler(cfg.sampler)  # guidance, when the sampler node sets it, applies to every point
    rows = []
    for name, steps in sweep_points(settings.nfe_samplers, settings.nfe_sweep, diffusion.num_timesteps):
        sampler = CountingSampler(sweep_sampler(name, steps))
        started = time.perf_counter()
        pixels = generate(diffusion, sampler, settings, images, device, seed=seed, guidance_scale=guidance_scale,
                          precision=precision)["arr_0"]  # fmt: skip
        seconds_per_image = (time.perf_counter() - started) / len(images)
        metrics = metrics_of(pixels, settings, fid, extractor, reference, device)
        nfe = sampler.calls / settings.num_batches  # per image batch: what one image costs
        rows.append({"sampler": name, "steps": steps or diffusion.num_timesteps, "nfe": int(round(nfe)),
                     "seconds_per_image": seconds_per_image, **metrics})  # fmt: skip
        log.info("%s, %s steps: NFE %d, %.3f s per image, FID %.3f", name, rows[-1]["steps"], rows[-1]["nfe"],
                 seconds_per_image, metrics["fid"])  # fmt: skip
    files = write_sweep_table(rows, run_dir)
    record = drawing_record(checkpoint=cfg.checkpoint, state=state, sampler_node={"_target_": "per row"},
                            num_timesteps=diffusion.num_timesteps, seed=seed, precision=precision,
                            ema_used=settings.use_ema and diffusion.ema is not None)  # fmt: skip
    generated = generation_protocol(settings.num_samples, {**record, "sampler": f"per row; guidance {guidance_scale:g}"},
                                    [seed], {})  # fmt: skip
    result = {"nfe_sweep": rows, "protocol": evaluation_protocol(extractor, reference, generated),
              "files": [str(f) for f in files]}  # fmt: skip
    write_json(run_dir / "metrics.json", result)
    for line in protocol_lines(result["protocol"]):
        log.info(line)
    return result
