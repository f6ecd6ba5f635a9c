"""The metrics of a set of generated images against the reference statistics: FID, KID, precision/recall and
the Inception Score, from one pass of the feature extractor."""

from typing import Any

import numpy as np
import torch

from ddpm.evaluation.metrics import (
    feature_statistics,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    precision_recall,
)
from ddpm.evaluation.reference import extract_features
from ddpm.evaluation.settings import EvalSettings, FidSettings


def image_metrics(
    images: np.ndarray,
    extractor: Any,
    reference: dict[str, Any],
    *,
    feature_batch_size: int,
    is_splits: int | None = 10,
    pr_num_samples: int | None = None,
    pr_k: int = 3,
    kid_subsets: int | None = None,
    kid_subset_size: int = 1000,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """FID of uint8 N x H x W x C images; IS unless is_splits is None, precision/recall unless pr_num_samples
    is, KID unless kid_subsets is. An Inception Score the extractor cannot give is None, with the reason."""
    features, logits = extract_features(extractor, images, feature_batch_size)
    mu, sigma = feature_statistics(features)
    # The IS splits are consecutive: shuffle (fixed order) so class-sorted samples do not bias them.
    order = np.random.default_rng(0).permutation(len(features))
    result: dict[str, Any] = {
        "fid": frechet_distance(mu, sigma, reference["mu"], reference["sigma"]),
        "num_samples": len(images),
    }
    real = reference["real_features"]
    if kid_subsets is not None:
        result["kid"], result["kid_std"] = kernel_inception_distance(real, features, kid_subsets, kid_subset_size)
        result["kid_subset_size"] = min(kid_subset_size, len(real), len(features))
    if pr_num_samples is not None:
        fake = features[order[:pr_num_samples]]
        precision, recall = precision_recall(real, fake, k=pr_k, device=str(device))
        result.update(precision=precision, recall=recall, pr_k=pr_k, pr_num_real=len(real), pr_num_fake=len(fake))
    if is_splits is not None:
        if logits is None:
            result.update(
                inception_score=None, inception_score_std=None, inception_score_unavailable=extractor.no_logits_reason
            )
        else:
            result["inception_score"], result["inception_score_std"] = inception_score(logits[order], splits=is_splits)
            result["inception_score_unavailable"] = None
    return result


def metrics_of(images: np.ndarray, settings: EvalSettings, fid: FidSettings, extractor, reference, device) -> dict:
    """image_metrics with the settings of eval.* and fid.*."""
    return image_metrics(
        images,
        extractor,
        reference,
        feature_batch_size=fid.batch_size,
        is_splits=settings.is_splits,
        pr_k=settings.pr_k,
        device=device,
        pr_num_samples=settings.pr_num_samples if settings.precision_recall else None,
        kid_subsets=settings.kid_subsets if settings.kid else None,
        kid_subset_size=settings.kid_subset_size,
    )


def across_seeds(per_seed: dict[int, dict]) -> dict:
    """One seed's metrics as they are; several seeds': FID as the minimum (EDM's convention), with the mean
    and the standard deviation (ddof=1), the other metrics as means, and every seed's metrics."""
    first = next(iter(per_seed.values()))
    if len(per_seed) == 1:
        return dict(first)
    fids = np.array([metrics["fid"] for metrics in per_seed.values()])
    result = {
        key: (float(np.mean([metrics[key] for metrics in per_seed.values()])) if isinstance(value, float) else value)
        for key, value in first.items()
    }
    result.update(
        fid=float(fids.min()),
        fid_mean=float(fids.mean()),
        fid_std=float(fids.std(ddof=1)),
        fid_per_seed={str(seed): metrics["fid"] for seed, metrics in per_seed.items()},
        per_seed={str(seed): metrics for seed, metrics in per_seed.items()},
    )
    return result
