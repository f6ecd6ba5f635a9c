"""The metrics of a set of generated images against the reference statistics: FID, Inception Score and
precision/recall, from one pass of the feature extractor."""

from typing import Any

import numpy as np
import torch

from ddpm.evaluation.reference import extract_features
from ddpm.metrics import feature_statistics, frechet_distance, inception_score, precision_recall


def image_metrics(
    images: np.ndarray, extractor: Any, reference: dict[str, Any], *, feature_batch_size: int, is_splits: int | None = 10,
    pr_num_samples: int | None = None, pr_k: int = 3, device: torch.device | str = "cpu",
) -> dict[str, Any]:  # fmt: skip
    """FID of uint8 N x H x W x C images; IS unless is_splits is None, precision/recall unless pr_num_samples is."""
    features, logits = extract_features(extractor, images, feature_batch_size)
    mu, sigma = feature_statistics(features)
    # The IS splits are consecutive: shuffle (fixed order) so class-sorted samples do not bias them.
    order = np.random.default_rng(0).permutation(len(logits))
    result = {
        "fid": frechet_distance(mu, sigma, reference["mu"], reference["sigma"]),
        "num_samples": len(images),
        "extractor": extractor.name,
        "reference": reference["path"],
        "reference_count": int(reference["count"]),
    }
    if is_splits is not None:
        result["inception_score"], result["inception_score_std"] = inception_score(logits[order], splits=is_splits)
    if pr_num_samples is not None:
        fake = features[order[:pr_num_samples]]
        real = reference["pr_features"]
        precision, recall = precision_recall(real, fake, k=pr_k, device=str(device))
        result.update(precision=precision, recall=recall, pr_num_real=len(real), pr_num_fake=len(fake))
    return result
