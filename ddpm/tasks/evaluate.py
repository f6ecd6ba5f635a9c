"""task=evaluate: FID, Inception Score and precision/recall of a checkpoint's samples, against the training set.

    python main.py task=evaluate checkpoint=PATH eval.num_samples=50000 sampler=ddpm
    python main.py task=evaluate eval.samples=PATH.npz                     # evaluate existing samples
    python main.py -m task=evaluate checkpoint=PATH eval.num_shards=4 eval.shard=0,1,2,3
    python main.py task=evaluate eval.merge=SWEEP_DIR                      # ... then merge the shards
    python main.py task=evaluate checkpoint=PATH eval.nfe_sweep=[10,20,50,100,1000]

Images are drawn in global batches of eval.batch_size, batch b from its own seed (eval.seed, b), and image j
gets class j mod C when the checkpoint is class-conditional. A shard is a contiguous range of whole batches,
so the shards of a sharded run hold exactly the images of the unsharded run (on the same kind of device).
"""

from __future__ import annotations

import csv
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate, to_absolute_path
from omegaconf import DictConfig, OmegaConf, open_dict

from ddpm.build import build_sampler, load_diffusion
from ddpm.checkpoint import write_atomically
from ddpm.errors import ConfigError
from ddpm.images import to_uint8
from ddpm.metrics import feature_statistics, frechet_distance, inception_score, precision_recall
from ddpm.fast_paths import prepare_for_sampling
from ddpm.training import resolve_device

log = logging.getLogger(__name__)

# Sampler names of eval.nfe_samplers -> their functions; ddpm has no step count (it takes every timestep).
SWEEP_SAMPLERS = {"ddim": "ddpm.samplers.ddim", "dpm_solver": "ddpm.samplers.dpm_solver", "ddpm": "ddpm.samplers.ddpm_ancestral"}
SHARD_FILE = re.compile(r"shard_(\d+)_of_(\d+)\.npz")


# -------------------------------------------------------------------------------------------------- settings


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_settings(cfg: DictConfig) -> None:
    """Every eval.* value, before anything slow happens; errors name the key and the value."""
    settings = cfg.eval
    for key in ("num_samples", "batch_size", "feature_batch_size", "is_splits", "pr_num_samples", "pr_k", "num_shards"):
        if not _is_count(settings[key]):
            raise ConfigError(f"eval.{key}={settings[key]!r} must be an integer >= 1")
    if settings.num_samples < max(2, settings.is_splits):
        raise ConfigError(f"eval.num_samples={settings.num_samples} must be >= eval.is_splits={settings.is_splits} (and >= 2)")
    shard = settings.shard
    if not isinstance(shard, int) or isinstance(shard, bool) or not 0 <= shard < settings.num_shards:
        raise ConfigError(f"eval.shard={shard!r} must be in 0..{settings.num_shards - 1} (eval.num_shards={settings.num_shards})")
    num_batches = -(-settings.num_samples // settings.batch_size)
    if settings.num_shards > num_batches:
        raise ConfigError(
            f"eval.num_shards={settings.num_shards} is more than the {num_batches} batches of eval.batch_size="
            f"{settings.batch_size} in eval.num_samples={settings.num_samples}: lower eval.batch_size"
        )
    sweep = settings.nfe_sweep
    if sweep is not None and (not OmegaConf.is_list(sweep) or not sweep or not all(_is_count(v) for v in sweep)):
        raise ConfigError(f"eval.nfe_sweep={sweep!r} must be null or a list of step counts, e.g. [10,20,50,100,1000]")
    unknown = [name for name in settings.nfe_samplers or [] if name not in SWEEP_SAMPLERS]
    if unknown or not settings.nfe_samplers:
        raise ConfigError(f"eval.nfe_samplers={settings.nfe_samplers!r}: choose from {list(SWEEP_SAMPLERS)}")
    sources = [f"{key}={value}" for key, value in (("eval.samples", settings.samples), ("eval.merge", settings.merge)) if value]
    if len(sources) > 1:
        raise ConfigError(f"{' and '.join(sources)}: give one source of samples, not both")
    if sources and (sweep is not None or settings.num_shards > 1):
        raise ConfigError(f"{sources[0]} reads existing samples: it does not go with eval.nfe_sweep or eval.num_shards > 1")
    if sweep is not None and settings.num_shards > 1:
        raise ConfigError("eval.nfe_sweep runs in one job: it does not go with eval.num_shards > 1")
    if not sources and cfg.checkpoint is None:
        raise ConfigError(
            "task=evaluate needs checkpoint=PATH (to draw samples), eval.samples=PATH.npz or eval.merge=SHARD_DIR"
        )


def dataset_name(dataset: DictConfig) -> str:
    """The name of the reference statistics: the dataset's factory and image size, plus a digest of the folder
    for dataset=folder (two folders must not share a cache file)."""
    name = f"{dataset._target_.rsplit('.', 1)[-1]}-{dataset.image_size}px"
    if dataset.get("path"):
        import hashlib

        name += "-" + hashlib.sha256(str(Path(to_absolute_path(dataset.path)).resolve()).encode()).hexdigest()[:8]
    return name


def check_dataset_matches(cfg: DictConfig, checkpoint_config: dict, checkpoint: str) -> None:
    """FID against another dataset than the training one is a silent mistake: refuse it."""
    trained = checkpoint_config.get("dataset", {})
    for key in ("_target_", "image_size"):
        if trained.get(key) != cfg.dataset.get(key):
            raise ConfigError(
                f"dataset.{key}={cfg.dataset.get(key)!r}, but checkpoint={checkpoint} was trained with "
                f"dataset.{key}={trained.get(key)!r}: pass the training dataset (e.g. dataset=digits) to compare with it"
            )


# ------------------------------------------------------------------------------------------------- generating


def batch_seed(seed: int, batch: int) -> int:
    """Independent streams per (seed, batch): any range of batches is reproducible on its own."""
    return int(np.random.SeedSequence([seed, batch]).generate_state(1)[0])


def shard_batches(num_samples: int, batch_size: int, shard: int, num_shards: int) -> range:
    """The global batch indices of one shard: contiguous, disjoint, together every batch."""
    num_batches = -(-num_samples // batch_size)
    return range(shard * num_batches // num_shards, (shard + 1) * num_batches // num_shards)


class CountingSampler:
    """Wraps a sampler to count network evaluations, so the sweep reports the NFE actually spent."""

    def __init__(self, sampler):
        self.sampler = sampler
        self.calls = 0

    def __call__(self, predict_noise, x, betas, **kwargs):
        def counted(x_t, t):
            self.calls += 1
            return predict_noise(x_t, t)

        return self.sampler(counted, x, betas, **kwargs)


def generate(
    diffusion, sampler, settings: DictConfig, batches: range, device: torch.device, guidance_scale: float = 0.0
) -> dict[str, np.ndarray]:
    """The images (uint8 N x H x W x C) of the given global batches, and their classes when conditional."""
    num_classes = diffusion.model.num_classes
    images, labels = [], []
    for batch in batches:
        start = batch * settings.batch_size
        count = min(settings.batch_size, settings.num_samples - start)
        y = torch.arange(start, start + count) % num_classes if num_classes else None
        generator = torch.Generator(device).manual_seed(batch_seed(settings.seed, batch))
        x = diffusion.sample(count, device, y.to(device) if y is not None else None, use_ema=settings.use_ema,
                             generator=generator, sampler=sampler, progress=sys.stderr.isatty(),
                             guidance_scale=guidance_scale, precision=settings.precision)  # fmt: skip
        images.append(to_uint8(x))
        if y is not None:
            labels.append(y.numpy())
        log.info("generated batch %d (%d images)", batch, count)
    arrays = {"arr_0": np.concatenate(images)}
    if labels:
        arrays["arr_1"] = np.concatenate(labels)
    return arrays


def save_npz(path: Path, arrays: dict[str, np.ndarray], meta: dict | None = None) -> Path:
    """Writes atomically: a killed job leaves no partial npz for the merge."""
    if meta is not None:
        arrays = {**arrays, "meta": np.array(json.dumps(meta, sort_keys=True))}
    return write_atomically(path, lambda file: np.savez(file, **arrays))


def read_samples(path: str | Path) -> np.ndarray:
    """uint8 N x H x W x C images from a guided-diffusion style npz (arr_0)."""
    path = Path(to_absolute_path(str(path)))
    if not path.is_file():
        raise ConfigError(f"eval.samples={path} does not exist")
    with np.load(path, allow_pickle=False) as data:
        if "arr_0" not in data:
            raise ConfigError(f"eval.samples={path} has no arr_0 (images N x H x W x C, uint8)")
        images = data["arr_0"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ConfigError(f"eval.samples={path}: arr_0 is {images.dtype} {images.shape}, expected uint8 N x H x W x (1 or 3)")
    return images


def merge_shards(directory: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """Every shard_I_of_N.npz of `directory`, checked complete and consistent, concatenated in order."""
    directory = Path(to_absolute_path(str(directory)))
    found = {}
    for path in directory.glob("shard_*_of_*.npz"):
        match = SHARD_FILE.fullmatch(path.name)
        if match:
            found[(int(match[1]), int(match[2]))] = path
    totals = sorted({total for _, total in found})
    if not totals:
        raise ConfigError(f"eval.merge={directory} holds no shard_I_of_N.npz files")
    if len(totals) > 1:
        raise ConfigError(f"eval.merge={directory} holds shards of different runs (of {totals} shards): keep one")
    total = totals[0]
    missing = [f"shard_{i}_of_{total}.npz" for i in range(total) if (i, total) not in found]
    if missing:
        raise ConfigError(f"eval.merge={directory} lacks {len(missing)} of {total} shards: {', '.join(missing)}")
    parts, metas = [], []
    for index in range(total):
        with np.load(found[(index, total)], allow_pickle=False) as data:
            parts.append({key: data[key] for key in data.files if key != "meta"})
            metas.append(json.loads(str(data["meta"])))
    first = {k: v for k, v in metas[0].items() if k != "shard"}
    for index, meta in enumerate(metas):
        if {k: v for k, v in meta.items() if k != "shard"} != first:
            raise ConfigError(f"eval.merge={directory}: shard_{index}_of_{total}.npz was drawn with other settings than shard_0")
    arrays = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
    if len(arrays["arr_0"]) != first["num_samples"]:
        raise ConfigError(f"eval.merge={directory}: the shards hold {len(arrays['arr_0'])} images, not {first['num_samples']}")
    return arrays, first


# ---------------------------------------------------------------------------------------------------- metrics


def extract(extractor, images: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Features and logits of uint8 N x H x W x C images, in batches."""
    features, logits = [], []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])).permute(0, 3, 1, 2)
        f, l = extractor(batch)
        features.append(np.asarray(f, np.float64))
        logits.append(np.asarray(l, np.float64))
    return np.concatenate(features), np.concatenate(logits)


def dataset_images(cfg: DictConfig) -> np.ndarray:
    """The training split as uint8 N x H x W x C, unflipped: what the model learned to reproduce."""
    extra = {"split": "train"}
    if "random_flip" in cfg.dataset:
        extra["random_flip"] = False
    dataset = instantiate(cfg.dataset, **extra)
    loader = torch.utils.data.DataLoader(dataset, batch_size=500, shuffle=False, num_workers=0)
    # to_uint8 inverts ToTensor + Normalize(0.5, 0.5) exactly: round((2 p / 255 - 1 + 1) * 127.5) = p.
    return np.concatenate([to_uint8(x) for x, _ in loader])


def reference_statistics(cfg: DictConfig, extractor) -> dict[str, Any]:
    """mu, sigma (and a subset of features for precision/recall) of the training set, cached in a file."""
    directory = Path(to_absolute_path(cfg.eval.reference_dir or str(Path(cfg.paths.data_dir) / "fid_stats")))
    path = directory / f"{dataset_name(cfg.dataset)}-{extractor.name}-train.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as data:
            log.info("reference statistics from %s", path)
            return {"path": str(path), **{key: data[key] for key in data.files}}
    log.info("computing the reference statistics of the training set into %s (once)", path)
    features, _ = extract(extractor, dataset_images(cfg), cfg.eval.feature_batch_size)
    mu, sigma = feature_statistics(features)
    # A fixed subset, so that precision/recall compares with the same real images every time.
    subset = np.random.default_rng(0).permutation(len(features))[: cfg.eval.pr_num_samples]
    stats = {"mu": mu, "sigma": sigma, "pr_features": features[np.sort(subset)].astype(np.float32),
             "count": np.array(len(features))}  # fmt: skip
    save_npz(path, stats)
    return {"path": str(path), **stats}


def compute_metrics(cfg: DictConfig, images: np.ndarray, extractor, reference: dict, device) -> dict[str, Any]:
    """FID, IS and (optionally) precision/recall of uint8 N x H x W x C images."""
    settings = cfg.eval
    features, logits = extract(extractor, images, settings.feature_batch_size)
    mu, sigma = feature_statistics(features)
    # The IS splits are consecutive: shuffle (fixed order) so class-sorted samples do not bias them.
    order = np.random.default_rng(0).permutation(len(logits))
    is_mean, is_std = inception_score(logits[order], splits=settings.is_splits)
    result = {
        "fid": frechet_distance(mu, sigma, reference["mu"], reference["sigma"]),
        "inception_score": is_mean,
        "inception_score_std": is_std,
        "num_samples": len(images),
        "extractor": extractor.name,
        "reference": reference["path"],
        "reference_count": int(reference["count"]),
    }
    if settings.precision_recall:
        fake = features[order[: settings.pr_num_samples]]
        real = reference["pr_features"]
        precision, recall = precision_recall(real, fake, k=settings.pr_k, device=str(device))
        result.update(precision=precision, recall=recall, pr_num_real=len(real), pr_num_fake=len(fake))
    return result


def write_json(path: Path, content: dict) -> Path:
    path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
    return path


# ---------------------------------------------------------------------------------------------------- the sweep


def sweep_points(names: list[str], steps: list[int], num_timesteps: int) -> list[tuple[str, int | None]]:
    """(sampler, steps) pairs: the step samplers at every count up to T, ddpm once at T."""
    points = []
    for name in names:
        if name == "ddpm":
            points.append((name, None))
            continue
        for count in steps:
            if count > num_timesteps:
                log.warning("eval.nfe_sweep: %s with %d steps skipped (the schedule has %d)", name, count, num_timesteps)
            else:
                points.append((name, count))
    return points


def sweep_sampler(name: str, steps: int | None):
    """The sampler function of a sweep point, imported only now: a sampler not in ddpm.samplers yet is a
    clear error, not an ImportError at the start."""
    node = {"_target_": SWEEP_SAMPLERS[name], "_partial_": True}
    if steps is not None:
        node["steps"] = steps
    try:
        return instantiate(node)
    except Exception as error:
        raise ConfigError(f"eval.nfe_samplers contains {name}, but {SWEEP_SAMPLERS[name]} cannot be built: {error}") from error


def write_sweep_table(rows: list[dict], run_dir: Path) -> list[Path]:
    """nfe_sweep.csv, nfe_sweep.md and nfe_sweep.png (FID against NFE, log x) in the run directory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = ["sampler", "steps", "nfe", "fid", "inception_score", "precision", "recall"]
    with open(run_dir / "nfe_sweep.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)

    def cell(value):
        return f"{value:.3f}" if isinstance(value, float) else ("" if value is None else str(value))

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    (run_dir / "nfe_sweep.md").write_text("\n".join(lines) + "\n")

    figure, axis = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(row["sampler"] for row in rows):
        points = sorted((row["nfe"], row["fid"]) for row in rows if row["sampler"] == name)
        axis.plot(*zip(*points), marker="o", label=name)
    axis.set(xscale="log", xlabel="network evaluations (NFE)", ylabel="FID", title="FID vs NFE")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(run_dir / "nfe_sweep.png", dpi=120)
    plt.close(figure)
    return [run_dir / f"nfe_sweep.{ext}" for ext in ("csv", "md", "png")]


def run_sweep(cfg, diffusion, extractor, reference, device, run_dir: Path) -> dict:
    settings = cfg.eval
    batches = shard_batches(settings.num_samples, settings.batch_size, 0, 1)
    # Classifier-free guidance, when the sampler node sets it, applies to every point of the sweep.
    _, guidance_scale = build_sampler(cfg.sampler)
    rows = []
    for name, steps in sweep_points(list(settings.nfe_samplers), list(settings.nfe_sweep), diffusion.num_timesteps):
        sampler = CountingSampler(sweep_sampler(name, steps))
        images = generate(diffusion, sampler, settings, batches, device, guidance_scale)["arr_0"]
        metrics = compute_metrics(cfg, images, extractor, reference, device)
        nfe = sampler.calls / len(batches)  # per image batch: what one image costs
        rows.append({"sampler": name, "steps": steps or diffusion.num_timesteps, "nfe": int(round(nfe)), **metrics})
        log.info("%s, %s steps: NFE %d, FID %.3f", name, rows[-1]["steps"], rows[-1]["nfe"], metrics["fid"])
    files = write_sweep_table(rows, run_dir)
    result = {"nfe_sweep": rows, "checkpoint": cfg.checkpoint, "seed": settings.seed, "guidance_scale": guidance_scale, "files": [str(f) for f in files]}
    write_json(run_dir / "metrics.json", result)
    return result


# -------------------------------------------------------------------------------------------------------- run


def default_shard_dir() -> Path:
    """The sweep directory in a multirun (shared by its jobs), else the run directory."""
    hydra = HydraConfig.get()
    if hydra.mode == RunMode.MULTIRUN:
        return Path(hydra.sweep.dir)
    return Path(hydra.runtime.output_dir)


def run(cfg: DictConfig) -> dict:
    """Samples (drawn, read or merged) -> features -> metrics.json; or one shard's samples; or the NFE sweep."""
    check_settings(cfg)
    settings = cfg.eval
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(settings.device, key="eval.device")
    source: dict[str, Any] = {}
    if settings.num_shards == 1:
        # Before drawing anything: missing Inception weights or data fail in seconds, not after hours of sampling.
        extractor = instantiate(settings.extractor, device=str(device))
        reference = reference_statistics(cfg, extractor)

    if settings.merge:
        arrays, meta = merge_shards(settings.merge)
        images, source = arrays["arr_0"], {"merged_from": str(to_absolute_path(settings.merge)), **meta}
        save_npz(run_dir / "samples.npz", arrays)
    elif settings.samples:
        images, source = read_samples(settings.samples), {"samples": str(to_absolute_path(settings.samples))}
    else:
        diffusion, state = load_diffusion(to_absolute_path(cfg.checkpoint), device)
        check_dataset_matches(cfg, state["config"], cfg.checkpoint)
        prepare_for_sampling(diffusion, device=device, precision=settings.precision, compile=settings.compile, key="eval")
        if settings.nfe_sweep is None:
            sampler, guidance_scale = build_sampler(cfg.sampler)
            source = {"checkpoint": cfg.checkpoint, "step": state["step"], "seed": settings.seed,
                      "num_samples": settings.num_samples, "batch_size": settings.batch_size, "use_ema": settings.use_ema,
                      "sampler": OmegaConf.to_container(cfg.sampler, resolve=True)}  # fmt: skip
            batches = shard_batches(settings.num_samples, settings.batch_size, settings.shard, settings.num_shards)
            arrays = generate(diffusion, sampler, settings, batches, device, guidance_scale)
            if settings.num_shards > 1:  # metrics of a part would mislead: they come from eval.merge
                shard_dir = Path(to_absolute_path(settings.shard_dir)) if settings.shard_dir else default_shard_dir()
                name = f"shard_{settings.shard}_of_{settings.num_shards}.npz"
                path = save_npz(shard_dir / name, arrays, {**source, "shard": settings.shard})
                log.info("wrote %s (%d images); merge with task=evaluate eval.merge=%s", path, len(arrays["arr_0"]), shard_dir)
                return {"shard": str(path), "count": len(arrays["arr_0"])}
            images = arrays["arr_0"]
            save_npz(run_dir / "samples.npz", arrays)

    if settings.nfe_sweep is not None:
        return run_sweep(cfg, diffusion, extractor, reference, device, run_dir)
    result = {**compute_metrics(cfg, images, extractor, reference, device), **source}
    write_json(run_dir / "metrics.json", result)
    log.info("FID %.3f, IS %.3f +- %.3f (%d samples) -> %s", result["fid"], result["inception_score"],
             result["inception_score_std"], result["num_samples"], run_dir / "metrics.json")  # fmt: skip
    return result


class FidDuringTraining:
    """`trainer.eval_rate`: a cheap FID of the EMA weights during training (e.g. 5k images from DDIM with 50
    steps), against the same cached reference statistics as task=evaluate. Images and features come from fixed
    seeds, so successive values differ only by the weights, and the training's random streams are not touched."""

    def __init__(self, cfg: DictConfig, device: torch.device, num_samples: int, steps: int):
        self.cfg = cfg.copy()
        with open_dict(self.cfg):
            self.cfg.eval.precision_recall = False  # FID only: the cheap part
        self.device = device
        self.extractor = instantiate(cfg.eval.extractor)
        self.reference = reference_statistics(cfg, self.extractor)
        self.sampler = sweep_sampler("ddim", steps)
        batch_size = min(cfg.eval.batch_size, num_samples)
        self.settings = OmegaConf.create({"batch_size": batch_size, "num_samples": num_samples,
                                          "seed": cfg.eval.seed, "use_ema": True,
                                          "precision": cfg.eval.precision})  # fmt: skip
        self.batches = range(-(-num_samples // batch_size))

    def __call__(self, diffusion) -> float:
        images = generate(diffusion, self.sampler, self.settings, self.batches, self.device)["arr_0"]
        return compute_metrics(self.cfg, images, self.extractor, self.reference, self.device)["fid"]
