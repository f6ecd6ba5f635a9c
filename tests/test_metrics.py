"""The metric functions against independent computations, and the feature extractors' contracts."""

import urllib.error

import numpy as np
import pytest
import torch

from ddpm.errors import ConfigError, DatasetNotFoundError, UserError
from ddpm.metrics import (
    INCEPTION_WEIGHTS_FILE,
    InceptionFeatures,
    TinyExtractor,
    feature_statistics,
    frechet_distance,
    inception_score,
    precision_recall,
)


def _sqrt_psd(matrix):
    """Square root of a symmetric positive semi-definite matrix by eigen-decomposition (no sqrtm)."""
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def _independent_fid(a, b):
    """FID via Tr sqrt(s1 s2) = Tr sqrt(sqrt(s1) s2 sqrt(s1)), which is symmetric PSD: eigh applies."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root1 = _sqrt_psd(s1)
    cross = _sqrt_psd(root1 @ s2 @ root1)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(cross))


def test_frechet_distance_matches_an_eigendecomposition_computation():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 16))
    b = rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16)) * 0.5 + 0.3
    expected = _independent_fid(a, b)
    assert frechet_distance(*feature_statistics(a), *feature_statistics(b)) == pytest.approx(expected, rel=1e-6)


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


def test_tiny_extractor_is_deterministic_and_takes_gray_or_rgb_uint8():
    images = torch.randint(0, 256, (6, 1, 16, 16), dtype=torch.uint8)
    features, logits = TinyExtractor()(images)
    again, _ = TinyExtractor()(images.expand(-1, 3, -1, -1).contiguous())
    assert features.shape == (6, 32) and logits.shape == (6, 10)
    np.testing.assert_allclose(features, again)
    with pytest.raises(ValueError, match="uint8"):
        TinyExtractor()(images.float())


def test_inception_with_a_missing_weights_file_names_the_file_and_the_key(tmp_path):
    missing = tmp_path / "nowhere" / INCEPTION_WEIGHTS_FILE
    with pytest.raises(ConfigError) as caught:
        InceptionFeatures(weights_path=str(missing))
    message = str(caught.value)
    assert f"fid.extractor.weights_path={missing} does not exist" in message
    assert "weights-inception-2015-12-05-6726825d.pth" in message


def test_inception_without_internet_says_which_file_to_place_where(monkeypatch):
    import torch_fidelity.feature_extractor_inceptionv3 as inception

    assert inception.URL_INCEPTION_V3.endswith(INCEPTION_WEIGHTS_FILE)  # the name we tell users is torch-fidelity's

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(inception, "load_state_dict_from_url", offline)
    with pytest.raises(DatasetNotFoundError) as caught:
        InceptionFeatures()
    message = str(caught.value)
    assert isinstance(caught.value, UserError)
    assert INCEPTION_WEIGHTS_FILE in message and "fid.extractor.weights_path=" in message
    assert str(torch.hub.get_dir()) in message
