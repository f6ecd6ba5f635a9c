"""task=evaluate: FID, KID, precision/recall and, where the feature network has a classifier, the Inception Score
of a checkpoint's samples against a split of its training data, with the protocol of the numbers (metrics.json).

    python main.py task=evaluate checkpoint=PATH eval.num_samples=50000 sampler=ddpm
    python main.py task=evaluate eval.samples=PATH.npz                     # existing samples (task=sample's npz: its data)
    python main.py -m task=evaluate checkpoint=PATH eval.num_shards=4 eval.shard=0,1,2,3
    python main.py task=evaluate eval.merge=SWEEP_DIR                      # ... then merge the shards
    python main.py task=evaluate checkpoint=PATH eval.nfe_sweep=[10,20,50,100,1000]
    python main.py task=evaluate checkpoint=PATH eval.nll=true eval.fid=false  # bits/dim on the test split

Image i is drawn from its own seed (eval.seed, i) and gets class i mod C when the checkpoint is class-conditional
(ddpm.diffusion.generation). A shard is a contiguous range of whole batches of eval.batch_size, so the shards of a sharded
run hold exactly the images of the unsharded run (on the same kind of device).
"""

import json
import logging
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

from ddpm.config.errors import ConfigError
from ddpm.config.validation import build_settings
from ddpm.diffusion.build import build_sampler, check_overrides_match, load_diffusion
from ddpm.evaluation.drawing import generate
from ddpm.evaluation.likelihood import test_split_nll
from ddpm.evaluation.nfe_sweep import run_nfe_sweep
from ddpm.evaluation.protocol import (
    drawing_record,
    evaluation_protocol,
    generation_protocol,
    summary,
)
from ddpm.evaluation.reference import reference_statistics
from ddpm.evaluation.samples import check_shard_dir, merge_shards, read_samples, save_npz, shard_name
from ddpm.evaluation.scores import across_seeds, metrics_of
from ddpm.evaluation.settings import EvalSettings, FidSettings
from ddpm.runtime.devices import configure_backends, resolve_device
from ddpm.runtime.fast_paths import prepare_for_sampling
from ddpm.training.preemption import stop_signals_end_at_once

log = logging.getLogger(__name__)


def check_settings(cfg: DictConfig) -> EvalSettings:
    """Every eval.* value, and a source of samples, before anything slow happens; errors name the key."""
    settings: EvalSettings = build_settings(cfg.eval)
    if not (settings.samples or settings.merge) and not cfg.checkpoint:
        raise ConfigError(
            "task=evaluate needs checkpoint=PATH (to draw samples), eval.samples=PATH.npz or eval.merge=SHARD_DIR"
        )
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
    # Every file is written atomically: a stop leaves whole files, and the same command starts again.
    with stop_signals_end_at_once("during the evaluation: stopping now; the files it wrote so far are whole"):
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
    configure_backends(device, deterministic=False)  # TF32 and cuDNN's autotuner, as training has them

    # The source of the samples first: a bad file or checkpoint fails in seconds.
    dataset, images, record, source = cfg.dataset, None, None, {}
    if settings.merge:
        arrays, record = merge_shards(settings.merge)
        images, source = arrays["arr_0"], {"merged_from": str(to_absolute_path(settings.merge))}
        save_npz(run_dir / "samples.npz", arrays, record)  # the whole set, as an unsharded run writes it
        dataset = training_dataset(
            cfg, record.get("dataset"), f"eval.merge={settings.merge} (from {record.get('checkpoint')})"
        )
    elif settings.samples:
        images, record = read_samples(settings.samples)
        source = {"samples": str(to_absolute_path(settings.samples))}
        if record:
            dataset = training_dataset(
                cfg, record.get("dataset"), f"eval.samples={settings.samples} (from {record.get('checkpoint')})"
            )
    else:
        diffusion, state = load_diffusion(to_absolute_path(cfg.checkpoint), device, trust=cfg.trust_checkpoint)
        check_overrides_match(cfg, state["config"], cfg.checkpoint, task="evaluate")
        dataset = training_dataset(cfg, state["config"].get("dataset", {}), f"checkpoint={cfg.checkpoint}")
        nll = test_split_nll(diffusion, state, dataset, settings, device) if settings.nll else None
        if not settings.fid:
            result = {
                "nll": nll,
                "protocol": {
                    "checkpoint": str(cfg.checkpoint),
                    "step": state.get("step"),
                    "dataset": OmegaConf.to_container(dataset, resolve=True),
                },
            }
            write_json(run_dir / "metrics.json", result)
            log.info("-> %s", run_dir / "metrics.json")
            return result
        precision = prepare_for_sampling(
            diffusion, device=device, precision=settings.precision, compile=settings.compile, key="eval"
        )
        sampler, guidance_scale = build_sampler(cfg.sampler, diffusion.betas)
        records = {
            seed: drawing_record(
                checkpoint=cfg.checkpoint,
                state=state,
                sampler_node=cfg.sampler,
                num_timesteps=diffusion.num_timesteps,
                seed=seed,
                precision=precision,
                ema_used=settings.use_ema and diffusion.ema is not None,
            )
            for seed in settings.seeds_to_draw
        }
    if settings.num_shards == 1:
        # Before drawing anything: missing Inception weights or data fail in seconds, not after hours of sampling.
        extractor = fid.build_extractor(device)
        reference = reference_statistics(fid, dataset, cfg.paths.data_dir, extractor)

    if images is not None:
        per_seed = {(record or {}).get("seed"): metrics_of(images, settings, fid, extractor, reference, device)}
    elif settings.nfe_sweep is not None:
        result = run_nfe_sweep(cfg, settings, fid, diffusion, extractor, reference, device, run_dir, precision, state)
        write_json(run_dir / "metrics.json", result)
        return result
    elif settings.num_shards > 1:  # metrics of a part would mislead: they come from eval.merge
        seed = settings.seeds_to_draw[0]
        shard_dir = Path(to_absolute_path(settings.shard_dir)) if settings.shard_dir else default_shard_dir()
        meta = {
            **records[seed],
            "num_samples": settings.num_samples,
            "batch_size": settings.batch_size,
            "shard": settings.shard,
        }
        check_shard_dir(shard_dir, meta, settings.num_shards)
        arrays = generate(
            diffusion,
            sampler,
            settings,
            settings.shard_images(),
            device,
            seed=seed,
            guidance_scale=guidance_scale,
            precision=precision,
        )
        path = save_npz(shard_dir / shard_name(settings.shard, settings.num_shards), arrays, meta)
        log.info("wrote %s (%d images); merge with task=evaluate eval.merge=%s", path, len(arrays["arr_0"]), shard_dir)
        return {"shard": str(path), "count": len(arrays["arr_0"])}
    else:
        per_seed = {}
        for seed in settings.seeds_to_draw:
            arrays = generate(
                diffusion,
                sampler,
                settings,
                range(settings.num_samples),
                device,
                seed=seed,
                guidance_scale=guidance_scale,
                precision=precision,
            )
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
