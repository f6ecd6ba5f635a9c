"""Every metric function of ddpm.evaluation.metrics against an exact small case, where tests/test_metrics.py
checks it only against limits or on degenerate inputs:

    feature_statistics          hand-computed mean and unbiased (N - 1) covariance; until now only used on both
                                sides of a comparison, or at 200,000 samples where N and N - 1 look alike
    frechet_distance            closed forms for non-commuting covariances (2 x 2, and rank one), where the suite
                                had only commuting ones and a numerical sqrtm; and a diagonal case by hand
    kernel_inception_distance   3-dimensional features, sets of different sizes, and several random subsets smaller
                                than the sets: mean and std of the unbiased MMD^2 of subsets of distinct rows,
                                where the suite pinned only one subset of all of two equal sets
    inception_score             a non-degenerate probability matrix, uneven splits and their std, and a two-image
                                case by hand, where the suite had uniform or one-hot predictions (std 0, one marginal)
    precision_recall            a brute-force k-NN count on a handful of points, with precision != recall and a
                                point exactly on a ball's boundary, where the suite had only limits
"""

import itertools
import math

import numpy as np
import pytest

from ddpm.evaluation.metrics import (
    feature_statistics,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    precision_recall,
)

# --- feature statistics --------------------------------------------------------------------------------------


def test_feature_statistics_are_the_mean_and_the_unbiased_covariance():
    features = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 1.0], [2.0, 3.0]])
    mu, sigma = feature_statistics(features)
    # deviations from (1, 1): (-1, -1), (1, -1), (-1, 0), (1, 2); sums of products over N - 1 = 3
    np.testing.assert_array_equal(mu, [1.0, 1.0])
    np.testing.assert_allclose(sigma, [[4 / 3, 2 / 3], [2 / 3, 2.0]], rtol=1e-15)
    with pytest.raises(ValueError, match="N >= 2"):
        feature_statistics(features[:1])


# --- FID -----------------------------------------------------------------------------------------------------


def test_frechet_distance_of_diagonal_gaussians_is_the_hand_computed_value():
    """|mu1 - mu2|^2 + sum (sqrt a1 - sqrt a2)^2: (1 + 4 + 0.25) + ((1 - 2)^2 + (2 - 1)^2 + (3 - 0.5)^2)."""
    mu1, mu2 = np.array([1.0, 0.0, 2.0]), np.array([0.0, 2.0, 1.5])
    sigma1, sigma2 = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 1.0, 0.25])
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(5.25 + 8.25, rel=1e-13)


def test_frechet_distance_of_non_commuting_2x2_covariances_is_the_closed_form():
    """For a 2 x 2 positive semi-definite M, tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)); with M = S1^1/2 S2 S1^1/2,
    tr M = tr(S1 S2) and det M = det S1 det S2, so no matrix square root is needed."""
    sigma1 = np.array([[2.0, 1.0], [1.0, 1.0]])
    sigma2 = np.array([[1.0, -0.5], [-0.5, 3.0]])
    assert not np.allclose(sigma1 @ sigma2, sigma2 @ sigma1)
    mu1, mu2 = np.array([0.5, -1.0]), np.array([-0.25, 1.0])
    # tr(S1 S2) = 1.5 + 2.5 = 4, det S1 = 1, det S2 = 2.75, |mu1 - mu2|^2 = 0.5625 + 4
    closed_form = 4.5625 + 3.0 + 4.0 - 2 * math.sqrt(4.0 + 2 * math.sqrt(1.0 * 2.75))
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(closed_form, rel=1e-12)
    assert frechet_distance(mu2, sigma2, mu1, sigma1) == pytest.approx(closed_form, rel=1e-12)


def test_frechet_distance_of_rank_one_covariances_is_the_closed_form():
    """S1 = u u^T, S2 = v v^T: S1^1/2 S2 S1^1/2 = (u.v)^2 u u^T / |u|^2, whose root has trace |u.v|, so
    FID = |mu1 - mu2|^2 + |u|^2 + |v|^2 - 2 |u.v|. Singular and non-commuting at once."""
    u, v = np.array([1.0, 2.0, 0.0]), np.array([3.0, -1.0, 2.0])  # u.v = 1, |u|^2 = 5, |v|^2 = 14
    mu1, mu2 = np.array([1.0, 0.0, 0.0]), np.array([0.0, 0.0, 2.0])  # |mu1 - mu2|^2 = 5
    fid = frechet_distance(mu1, np.outer(u, u), mu2, np.outer(v, v))
    assert fid == pytest.approx(5.0 + 5.0 + 14.0 - 2.0, rel=1e-9)


# --- KID -----------------------------------------------------------------------------------------------------

REAL = np.array([[0.5, -1.0, 2.0], [1.5, 0.0, -0.5], [-1.0, 2.0, 1.0], [0.0, 0.5, 0.5], [2.0, 1.0, -1.5]])
FAKE = np.array([[1.0, 1.0, 1.0], [-0.5, 2.5, 0.0], [3.0, -1.0, 0.5], [0.0, 0.0, -2.0]])


def unbiased_mmd2(x, y) -> float:
    """Binkowski et al. 2018, Eq. 2 term by term with k(a, b) = (a.b / d + 1)^3, d the feature dimension."""
    m, n, d = len(x), len(y), x.shape[1]
    k = lambda a, b: (sum(ai * bi for ai, bi in zip(a, b, strict=True)) / d + 1) ** 3
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def subset_values(size: int) -> np.ndarray:
    """The MMD^2 of every pair (subset of `size` distinct real rows, subset of `size` distinct fake rows)."""
    return np.array(
        [
            unbiased_mmd2(REAL[list(a)], FAKE[list(b)])
            for a in itertools.combinations(range(len(REAL)), size)
            for b in itertools.combinations(range(len(FAKE)), size)
        ]
    )


def test_kid_of_two_whole_sets_of_3_dimensional_features_is_the_unbiased_mmd():
    kid, std = kernel_inception_distance(REAL[:4], FAKE, num_subsets=2, subset_size=4)  # each subset is a whole set
    assert kid == pytest.approx(unbiased_mmd2(REAL[:4], FAKE), rel=1e-12) and std == pytest.approx(0, abs=1e-12)


def test_kid_of_sets_of_different_sizes_draws_subsets_of_the_smaller_size():
    """5 real and 4 fake rows, subset_size 10: subsets of 4 distinct rows of each, so 4 of the 5 real rows."""
    kid, std = kernel_inception_distance(REAL, FAKE, num_subsets=1, subset_size=10)
    values = subset_values(4)
    assert np.isclose(values, kid, rtol=1e-12, atol=0).any() and std == 0
    assert not np.isclose(unbiased_mmd2(REAL, FAKE), kid, rtol=1e-6)  # not all 5 real rows against the 4


def test_kid_over_random_subsets_is_the_mean_and_population_std_of_their_unbiased_mmds():
    """3 subsets of 2 rows of each set: (mean, std with ddof=0, as torch-fidelity and Binkowski et al.'s code) of
    three of the 60 possible subset values, whatever the order of the random draws."""
    kid, std = kernel_inception_distance(REAL, FAKE, num_subsets=3, subset_size=2, seed=4)
    values = subset_values(2)
    triples = np.stack(np.meshgrid(values, values, values, indexing="ij"), axis=-1).reshape(-1, 3)
    means, stds = triples.mean(axis=1), triples.std(axis=1)
    matches = np.isclose(means, kid, rtol=1e-12, atol=1e-15) & np.isclose(stds, std, rtol=1e-9, atol=1e-15)
    assert matches.any(), (kid, std)
    assert std > 0  # the subsets are drawn afresh for each of the three


# --- Inception Score -----------------------------------------------------------------------------------------

PROBS = np.array(
    [
        [0.7, 0.2, 0.1],
        [0.1, 0.8, 0.1],
        [0.3, 0.3, 0.4],
        [0.05, 0.05, 0.9],
        [0.6, 0.0, 0.4],
        [0.25, 0.5, 0.25],
    ]
)


def reference_inception_score(probs, bounds):
    """exp(mean over images of KL(p(y|x) || p(y))) per split, p(y) the split's mean; (mean, population std)."""
    scores = []
    for start, stop in bounds:
        rows = probs[start:stop]
        marginal = [sum(row[c] for row in rows) / len(rows) for c in range(probs.shape[1])]
        kls = [sum(p * math.log(p / q) for p, q in zip(row, marginal, strict=True) if p > 0) for row in rows]
        scores.append(math.exp(sum(kls) / len(kls)))
    mean = sum(scores) / len(scores)
    return mean, math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores))


def test_inception_score_of_two_images_is_four_thirds_to_the_three_quarters():
    """p = (1, 0) and (1/2, 1/2): p(y) = (3/4, 1/4), KLs log(4/3) and (log(2/3) + log 2) / 2 = log(4/3) / 2."""
    mean, std = inception_score(np.array([[1.0, 0.0], [0.5, 0.5]]), splits=1, from_logits=False)
    assert mean == pytest.approx((4 / 3) ** 0.75, rel=1e-14) and std == 0


@pytest.mark.parametrize(
    "splits, bounds",
    [(1, [(0, 6)]), (2, [(0, 3), (3, 6)]), (4, [(0, 2), (2, 4), (4, 5), (5, 6)])],  # consecutive, larger first
)
def test_inception_score_of_a_probability_matrix_is_the_formula_per_split(splits, bounds):
    mean, std = inception_score(PROBS, splits=splits, from_logits=False)
    expected_mean, expected_std = reference_inception_score(PROBS, bounds)
    assert mean == pytest.approx(expected_mean, rel=1e-12)
    assert std == pytest.approx(expected_std, rel=1e-9, abs=1e-15)
    if splits > 1:
        assert std > 0


def test_inception_score_of_logits_is_that_of_their_softmax():
    """Logits log p + a per-image constant: the softmax gives p back (a zero probability becomes a very
    negative logit, whose term vanishes)."""
    offsets = np.array([[3.0], [-2.0], [0.5], [10.0], [-7.0], [1.0]])
    logits = np.log(np.where(PROBS > 0, PROBS, 1e-300)) + offsets
    mean, std = inception_score(logits, splits=2)
    expected_mean, expected_std = reference_inception_score(PROBS, [(0, 3), (3, 6)])
    assert mean == pytest.approx(expected_mean, rel=1e-12) and std == pytest.approx(expected_std, rel=1e-9)


# --- precision and recall ------------------------------------------------------------------------------------

# Integer coordinates: every distance used below (5, 8, ...) is exact in float32 too.
PR_REAL = [(0, 0), (3, 4), (6, 0), (0, 8), (9, 12)]
PR_FAKE = [(-5, 0), (3, 0), (12, 4), (20, 0)]  # (-5, 0) lies exactly on the boundary of (0, 0)'s 1-NN ball


def brute_force_precision_recall(real, fake, k):
    """Kynkaanniemi et al. 2019 by counting: a point is in a set's manifold when it is within (<=) the distance
    from some member to that member's k-th nearest other member."""

    def radii(points):
        return [sorted(math.dist(p, q) for j, q in enumerate(points) if j != i)[k - 1] for i, p in enumerate(points)]

    def share_inside(points, centres):
        balls = list(zip(centres, radii(centres), strict=True))
        return sum(any(math.dist(p, c) <= r for c, r in balls) for p in points) / len(points)

    return share_inside(fake, real), share_inside(real, fake)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_precision_recall_is_the_brute_force_k_nn_count(k):
    expected = brute_force_precision_recall(PR_REAL, PR_FAKE, k)
    got = precision_recall(np.array(PR_REAL, float), np.array(PR_FAKE, float), k=k, batch_size=2)
    assert got == pytest.approx(expected, abs=1e-12)


def test_precision_recall_by_hand_with_a_point_on_a_boundary():
    """k = 1. Real radii: 5, 5, 5, 5 and sqrt(97) for (9, 12); fake radii 8, 8, sqrt(80), sqrt(80).
    Precision: (-5, 0) on (0, 0)'s ball (distance 5), (3, 0) and (12, 4) inside, (20, 0) outside: 3/4.
    Recall: every real point but (0, 8) within a fake ball ((9, 12) by sqrt(73) <= sqrt(80)): 4/5.
    Not symmetric, and the boundary counts."""
    precision, recall = precision_recall(np.array(PR_REAL, float), np.array(PR_FAKE, float), k=1)
    assert (precision, recall) == (0.75, 0.8)
    assert brute_force_precision_recall(PR_REAL, PR_FAKE, 1) == (0.75, 0.8)
    # the sets swapped: precision and recall swap
    assert precision_recall(np.array(PR_FAKE, float), np.array(PR_REAL, float), k=1) == (0.8, 0.75)
