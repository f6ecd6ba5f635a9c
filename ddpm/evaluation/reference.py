"""The reference statistics FID compares with: the features of the dataset's training split, computed once per
(dataset, extractor) and cached as an npz."""

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate, to_absolute_path
from omegaconf import DictConfig

from ddpm.evaluation.samples import save_npz
from ddpm.evaluation.settings import FidSettings
from ddpm.images import to_uint8
from ddpm.metrics import feature_statistics

log = logging.getLogger(__name__)


def extract_features(extractor: Any, images: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Features and logits of uint8 N x H x W x C images, in batches."""
    features, logits = [], []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])).permute(0, 3, 1, 2)
        f, l = extractor(batch)
        features.append(np.asarray(f, np.float64))
        logits.append(np.asarray(l, np.float64))
    return np.concatenate(features), np.concatenate(logits)


def dataset_name(dataset: DictConfig) -> str:
    """The name of the reference statistics: the dataset's factory and image size, plus a digest of the folder
    for dataset=folder (two folders must not share a cache file)."""
    name = f"{dataset._target_.rsplit('.', 1)[-1]}-{dataset.image_size}px"
    if dataset.get("path"):
        name += "-" + hashlib.sha256(str(Path(to_absolute_path(dataset.path)).resolve()).encode()).hexdigest()[:8]
    return name


def dataset_images(dataset: DictConfig) -> np.ndarray:
    """The training split as uint8 N x H x W x C, unflipped: what the model learned to reproduce."""
    extra = {"split": "train"}
    if "random_flip" in dataset:
        extra["random_flip"] = False
    loader = torch.utils.data.DataLoader(instantiate(dataset, **extra), batch_size=500, shuffle=False, num_workers=0)
    # to_uint8 inverts ToTensor + Normalize(0.5, 0.5) exactly: round((2 p / 255 - 1 + 1) * 127.5) = p.
    return np.concatenate([to_uint8(x) for x, _ in loader])


def reference_statistics(fid: FidSettings, dataset: DictConfig, data_dir: str, extractor: Any) -> dict[str, Any]:
    """mu, sigma (and a fixed subset of features for precision/recall) of the training set, from the cache in
    fid.reference_dir (default <data_dir>/fid_stats), computed first when the cache has none."""
    directory = Path(to_absolute_path(fid.reference_dir or str(Path(data_dir) / "fid_stats")))
    path = directory / f"{dataset_name(dataset)}-{extractor.name}-train.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as data:
            log.info("reference statistics from %s", path)
            return {"path": str(path), **{key: data[key] for key in data.files}}
    log.info("computing the reference statistics of the training set into %s (once)", path)
    features, _ = extract_features(extractor, dataset_images(dataset), fid.batch_size)
    mu, sigma = feature_statistics(features)
    # A fixed subset, so that precision/recall compares with the same real images every time.
    subset = np.random.default_rng(0).permutation(len(features))[: fid.reference_pr_images]
    stats = {"mu": mu, "sigma": sigma, "pr_features": features[np.sort(subset)].astype(np.float32),
             "count": np.array(len(features))}  # fmt: skip
    save_npz(path, stats)
    return {"path": str(path), **stats}
