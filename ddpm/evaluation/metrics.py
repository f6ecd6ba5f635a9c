"""Sample-quality metrics of features: FID, KID, Inception Score and precision/recall.

Pure functions (NumPy in, numbers out); the networks that give the features are in ddpm.evaluation.feature_extractors.
"""

from __future__ import annotations

import numpy as np
import torch

# ----------------------------------------------------------------------------------------------- statistics


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The mean and covariance (unbiased, rows are samples) of features [N, D], in float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"features must be [N, D] with N >= 2, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric positive semi-definite matrix (rounding's negative eigenvalues
    taken as the zeros they are)."""
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)): the FID between two Gaussians.

    The reference implementation (TTUR / pytorch-fid) takes scipy's sqrtm of the non-symmetric product. Only
    its trace matters, and sigma1 sigma2 has the eigenvalues of the symmetric positive semi-definite
    sqrt(sigma1) sigma2 sqrt(sigma1), so two symmetric eigendecompositions give the same number: several times
    faster at 2048 dimensions, and exact where the covariances are singular (fewer samples than dimensions),
    where sqrtm needs a diagonal offset and leaves imaginary rounding behind. The suite checks it against sqrtm.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different dimensions: {mu1.shape} vs {mu2.shape}")
    if not (np.isfinite(sigma1).all() and np.isfinite(sigma2).all()):
        raise ValueError("FID: a covariance matrix has non-finite entries (NaN or infinite features)")
    diff = mu1 - mu2
    root1 = _psd_sqrt(sigma1)
    product = root1 @ sigma2 @ root1
    trace_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((product + product.T) / 2), 0, None)).sum()
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_covmean)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)  # no overflow in exp
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def inception_score(scores: np.ndarray, splits: int = 10, from_logits: bool = True) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))), the mean and standard deviation over `splits` consecutive splits.

    `scores` are class logits [N, C] (or probabilities, from_logits=False). The splits are taken in order, as
    in the reference: shuffle images sorted by class first (the evaluate task does).
    """
    scores = np.asarray(scores, dtype=np.float64)
    probs = _softmax(scores) if from_logits else scores
    if len(probs) < splits:
        raise ValueError(f"inception_score needs at least splits={splits} samples, got {len(probs)}")
    values = []
    for part in np.array_split(probs, splits):
        marginal = part.mean(axis=0, keepdims=True)
        # 0 * log 0 = 0: confident one-hot predictions are a valid input.
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(part > 0, part * (np.log(part) - np.log(marginal)), 0.0)
        values.append(np.exp(terms.sum(axis=1).mean()))
    return float(np.mean(values)), float(np.std(values))


def _kth_neighbour_radii(features: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    """Distance of every row to its k-th nearest other row (the row itself, at distance 0, is skipped)."""
    radii = []
    for start in range(0, len(features), batch_size):
        distances = torch.cdist(features[start : start + batch_size], features)
        radii.append(distances.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def _fraction_inside(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, batch_size: int) -> float:
    """The fraction of `points` inside at least one ball (centre, radius): the k-NN estimate of a manifold."""
    inside = 0
    for start in range(0, len(points), batch_size):
        distances = torch.cdist(points[start : start + batch_size], centres)
        inside += int((distances <= radii[None, :]).any(dim=1).sum())
    return inside / len(points)


def precision_recall(
    real_features: np.ndarray, fake_features: np.ndarray, k: int = 3, batch_size: int = 1000, device: str = "cpu"
) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019): precision is the fraction of generated
    samples inside the real manifold (union of k-NN balls around real features), recall the fraction of real
    samples inside the generated manifold. Quadratic in N: pass subsets (the task uses eval.pr_num_samples)."""
    if min(len(real_features), len(fake_features)) <= k:
        raise ValueError(f"precision_recall needs more than k={k} samples of each kind")
    real = torch.as_tensor(np.asarray(real_features), dtype=torch.float32, device=device)
    fake = torch.as_tensor(np.asarray(fake_features), dtype=torch.float32, device=device)
    real_radii = _kth_neighbour_radii(real, k, batch_size)
    fake_radii = _kth_neighbour_radii(fake, k, batch_size)
    precision = _fraction_inside(fake, real, real_radii, batch_size)
    recall = _fraction_inside(real, fake, fake_radii, batch_size)
    return precision, recall


def _polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x @ y.T / x.shape[1] + 1) ** 3


def kernel_inception_distance(
    real_features: np.ndarray, fake_features: np.ndarray, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """KID (Binkowski et al. 2018): the unbiased estimate of MMD^2 with the kernel k(x, y) = (x.y / d + 1)^3,
    over `num_subsets` random subsets of min(subset_size, N_real, N_fake) rows of each; mean and std.
    Unlike FID it has no bias in the number of samples, so small sets compare fairly."""
    real = np.asarray(real_features, np.float64)
    fake = np.asarray(fake_features, np.float64)
    size = min(subset_size, len(real), len(fake))
    if size < 2:
        raise ValueError(
            f"kernel_inception_distance needs at least 2 samples of each kind, got {len(real)}, {len(fake)}"
        )
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(num_subsets):
        x = real[rng.choice(len(real), size, replace=False)]
        y = fake[rng.choice(len(fake), size, replace=False)]
        k_xx, k_yy, k_xy = _polynomial_kernel(x, x), _polynomial_kernel(y, y), _polynomial_kernel(x, y)
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (size * (size - 1))
        values.append(within - 2 * k_xy.mean())
    return float(np.mean(values)), float(np.std(values))
