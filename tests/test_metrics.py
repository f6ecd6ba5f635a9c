"""The metric functions against independent computations (closed forms, torch-fidelity's KID)."""

import numpy as np
import pytest
import torch

from ddpm.evaluation.metrics import (
    feature_statistics,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    precision_recall,
)


def _reference_fid(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """pytorch-fid's computation: scipy's sqrtm of the non-symmetric product, a diagonal offset where that is
    not finite, the imaginary rounding dropped."""
    import scipy.linalg

    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(sigma1)) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean.real))


@pytest.mark.parametrize("num_a, num_b, dims", [(500, 400, 16), (40, 30, 256)], ids=["full-rank", "singular"])
def test_frechet_distance_equals_the_reference_sqrtm_computation(num_a, num_b, dims):
    """Full-rank covariances, and fewer samples than dimensions (as in a small FID of 2048 features)."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(num_a, dims))
    b = rng.normal(size=(num_b, dims)) @ rng.normal(size=(dims, dims)) * 0.5 + 0.3
    stats_a, stats_b = feature_statistics(a), feature_statistics(b)
    assert frechet_distance(*stats_a, *stats_b) == pytest.approx(_reference_fid(*stats_a, *stats_b), rel=1e-6)


def test_frechet_distance_of_non_finite_statistics_says_so():
    sigma = np.eye(3)
    sigma[0, 1] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        frechet_distance(np.zeros(3), sigma, np.zeros(3), np.eye(3))


def test_frechet_distance_of_identical_statistics_is_zero_and_handles_singular_covariances():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(200, 8))
    stats = feature_statistics(features)
    assert abs(frechet_distance(*stats, *stats)) < 1e-6
    # Fewer samples than dimensions: singular covariances, still a finite, non-negative, symmetric value.
    few_a, few_b = rng.normal(size=(5, 32)), rng.normal(size=(5, 32)) + 1
    forward = frechet_distance(*feature_statistics(few_a), *feature_statistics(few_b))
    backward = frechet_distance(*feature_statistics(few_b), *feature_statistics(few_a))
    assert np.isfinite(forward) and forward > 0 and forward == pytest.approx(backward, rel=1e-3)


def test_frechet_distance_of_shifted_gaussians_is_the_squared_shift():
    mu, sigma = np.zeros(4), np.eye(4)
    assert frechet_distance(mu, sigma, mu + 2, sigma) == pytest.approx(16.0)


def test_inception_score_of_uniform_predictions_is_one():
    mean, std = inception_score(np.zeros((100, 10)), splits=10)
    assert mean == pytest.approx(1.0) and std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_of_confident_evenly_spread_predictions_is_the_number_of_classes():
    probs = np.eye(10)[np.arange(1000) % 10]  # one-hot, every class equally often in every split
    mean, std = inception_score(probs, splits=10, from_logits=False)
    assert mean == pytest.approx(10.0) and std == pytest.approx(0.0, abs=1e-9)
    # The same from (very confident) logits.
    assert inception_score(probs * 50, splits=10)[0] == pytest.approx(10.0, rel=1e-6)


def test_inception_score_of_confident_predictions_on_half_the_classes_is_half():
    probs = np.eye(10)[np.arange(1000) % 5]
    assert inception_score(probs, splits=5, from_logits=False)[0] == pytest.approx(5.0)


def test_precision_recall_of_the_same_distribution_is_high_and_of_a_far_one_zero():
    rng = np.random.default_rng(2)
    real = rng.normal(size=(400, 4))
    same = rng.normal(size=(400, 4))
    precision, recall = precision_recall(real, same, k=3, batch_size=64)
    assert precision > 0.8 and recall > 0.8
    precision, recall = precision_recall(real, same + 100, k=3)
    assert precision == 0.0 and recall == 0.0
    # Mode collapse: every fake sample near one real point: precise, but recalls little.
    collapsed = real[:1] + rng.normal(size=(400, 4)) * 1e-3
    precision, recall = precision_recall(real, collapsed, k=3)
    assert precision == 1.0 and recall < 0.1


def test_frechet_distance_equals_the_closed_form_of_two_gaussians_with_commuting_covariances():
    """Sigma_i = R diag(a_i) R^T share eigenvectors: FID = |mu1 - mu2|^2 + sum (sqrt a1 - sqrt a2)^2."""
    rng = np.random.default_rng(3)
    rotation, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    a1, a2 = rng.uniform(0.1, 4, 16), rng.uniform(0.1, 4, 16)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    closed_form = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a1) - np.sqrt(a2)) ** 2)
    sigma1, sigma2 = rotation @ np.diag(a1) @ rotation.T, rotation @ np.diag(a2) @ rotation.T
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(closed_form, rel=1e-9)
    # From samples of the two Gaussians: the estimate converges to the closed form.
    x = rng.multivariate_normal(mu1, sigma1, size=200_000)
    y = rng.multivariate_normal(mu2, sigma2, size=200_000)
    assert frechet_distance(*feature_statistics(x), *feature_statistics(y)) == pytest.approx(closed_form, rel=0.02)


def _unbiased_mmd2(x, y):
    """MMD^2 with the cubic polynomial kernel, term by term (Binkowski et al. 2018, eq. 2), in loops."""
    d, m = x.shape[1], len(x)
    k = lambda a, b: (a @ b / d + 1) ** 3
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_on_whole_sets_equals_the_unbiased_mmd_and_torch_fidelity():
    from torch_fidelity.metric_kid import kid_features_to_metric

    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(40, 8)), rng.normal(0.3, 1.2, size=(40, 8))
    kid, std = kernel_inception_distance(real, fake, num_subsets=1, subset_size=40)  # a subset of all rows: no sampling
    assert kid == pytest.approx(_unbiased_mmd2(real, fake), rel=1e-10) and std == 0
    theirs = kid_features_to_metric(
        torch.from_numpy(real),
        torch.from_numpy(fake),
        kid_subsets=1,
        kid_subset_size=40,
        kid_degree=3,
        kid_gamma=None,
        kid_coef0=1,
        rng_seed=0,
        verbose=False,
    )
    assert kid == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-10)


def test_kid_is_near_zero_for_one_distribution_and_grows_with_the_distance():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(600, 32))
    same, near, far = rng.normal(size=(600, 32)), rng.normal(0.2, 1, size=(600, 32)), rng.normal(1, 1, size=(600, 32))
    kid_same, std_same = kernel_inception_distance(real, same, num_subsets=20, subset_size=300)
    assert abs(kid_same) < 3 * std_same + 1e-3  # unbiased: no offset for a finite sample
    kid_near, _ = kernel_inception_distance(real, near, num_subsets=20, subset_size=300)
    kid_far, _ = kernel_inception_distance(real, far, num_subsets=20, subset_size=300)
    assert kid_same < kid_near < kid_far
    with pytest.raises(ValueError, match="at least 2"):
        kernel_inception_distance(real[:1], same)
