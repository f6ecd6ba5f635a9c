"""The reference statistics FID compares with: the features of a split of the dataset (the training split by
default), computed once per (dataset, split, image count, extractor and its weights) and cached as an npz."""

import hashlib
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate, to_absolute_path
from omegaconf import DictConfig
from tqdm import tqdm

from ddpm.config.errors import ConfigError
from ddpm.evaluation.metrics import feature_statistics
from ddpm.evaluation.samples import read_npz, save_npz
from ddpm.evaluation.settings import FidSettings
from ddpm.io.images import to_uint8
from ddpm.runtime.preflight import check_writable

log = logging.getLogger(__name__)


def extract_features(extractor: Any, images: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Features and logits (None when the extractor has no classifier) of uint8 N x H x W x C images, in batches."""
    features, logits = [], []
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc=f"features ({extractor.name})", unit="batch", disable=not sys.stderr.isatty()):
        batch = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])).permute(0, 3, 1, 2)
        batch_features, batch_logits = extractor(batch)
        features.append(np.asarray(batch_features, np.float64))
        if batch_logits is not None:
            logits.append(np.asarray(batch_logits, np.float64))
    return np.concatenate(features), np.concatenate(logits) if logits else None


def dataset_name(dataset: DictConfig) -> str:
    """The name of the reference statistics: the dataset's factory and image size, plus a digest of the folder
    for dataset=folder (two folders must not share a cache file)."""
    name = f"{dataset._target_.rsplit('.', 1)[-1]}-{dataset.image_size}px"
    if dataset.get("path"):
        name += "-" + hashlib.sha256(str(Path(to_absolute_path(dataset.path)).resolve()).encode()).hexdigest()[:8]
    return name


def dataset_images(dataset: DictConfig, split: str = "train", limit: int | None = None) -> np.ndarray:
    """The split's images as uint8 N x H x W x C, unflipped (what the model learned to reproduce); the first
    `limit` of them in the dataset's order when given."""
    extra = {"split": split}
    if "random_flip" in dataset:
        extra["random_flip"] = False
    data = instantiate(dataset, **extra)
    if data is None:
        raise ConfigError(f"fid.reference_split={split}: dataset {dataset._target_} has no {split} split (use train)")
    if limit is not None:
        if limit > len(data):
            raise ConfigError(f"fid.reference_num_images={limit}, but the {split} split holds {len(data)} images")
        data = torch.utils.data.Subset(data, range(limit))
    loader = torch.utils.data.DataLoader(data, batch_size=500, shuffle=False, num_workers=0)
    # to_uint8 inverts ToTensor + Normalize(0.5, 0.5) exactly: round((2 p / 255 - 1 + 1) * 127.5) = p.
    return np.concatenate([to_uint8(x) for x, _ in loader])


def statistics_file(fid: FidSettings, dataset: DictConfig, data_dir: str, extractor: Any) -> Path:
    """The cache file: named by the data, the split, the image count and the extractor with its weights'
    hash, so statistics of another network, split or count are never read for these."""
    directory = Path(to_absolute_path(fid.reference_dir or str(Path(data_dir) / "fid_stats")))
    count = fid.reference_num_images or "all"
    return directory / (
        f"{dataset_name(dataset)}-{fid.reference_split}-{count}-{extractor.name}-{extractor.weights_sha256[:12]}.npz"
    )


def reference_statistics(fid: FidSettings, dataset: DictConfig, data_dir: str, extractor: Any) -> dict[str, Any]:
    """mu, sigma and a fixed subset of the features (for KID and precision/recall) of the reference split, from
    the cache in fid.reference_dir (default <data_dir>/fid_stats), computed first when the cache has none."""
    path = statistics_file(fid, dataset, data_dir, extractor)
    protocol = {
        "dataset": dataset_name(dataset),
        "split": fid.reference_split,
        "extractor": extractor.name,
        "weights_sha256": extractor.weights_sha256,
    }
    if path.is_file():
        data = read_npz(path, "fid.reference_dir")
        meta = json.loads(str(data.pop("meta"))) if "meta" in data else {}
        if {key: meta.get(key) for key in protocol} == protocol:
            log.info("reference statistics from %s", path)
            return {"path": str(path), "num_images": meta["num_images"], **protocol, **data}
        log.warning("%s was computed with other settings (%s): computing it again", path, meta or "no record")
    if fid.reference_dir:
        where, elsewhere = f"fid.reference_dir={fid.reference_dir}", "point fid.reference_dir at"
    else:
        where, elsewhere = f"paths.data_dir={data_dir} (its fid_stats/)", "point fid.reference_dir or paths.data_dir at"
    check_writable(path.parent, where, elsewhere=elsewhere)  # before the features are computed, not at their save
    log.info("computing the reference statistics of the %s split into %s (once)", fid.reference_split, path)
    features, _ = extract_features(
        extractor, dataset_images(dataset, fid.reference_split, fid.reference_num_images), fid.batch_size
    )
    mu, sigma = feature_statistics(features)
    # A fixed subset, so that KID and precision/recall compare with the same real images every time.
    subset = np.random.default_rng(0).permutation(len(features))[: fid.reference_pr_images]
    stats = {"mu": mu, "sigma": sigma, "real_features": features[np.sort(subset)].astype(np.float32)}
    meta = {**protocol, "num_images": len(features), "preprocessing": extractor.preprocessing}
    save_npz(path, stats, meta)
    return {"path": str(path), "num_images": len(features), **protocol, **stats}
