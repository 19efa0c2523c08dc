"""The mathematics of the evaluation metrics, checked against independent computations.

Frechet distance: closed form for diagonal covariances, and scipy's general matrix square
root (the formula as usually written) on random full covariances. F-Consistency: hand-made
embeddings whose cosines are known.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from trip.eval.fconsistency import f_consistency
from trip.eval.frechet import (
    fit_gaussian,
    frechet_distance,
    frechet_distance_features,
    trace_sqrt_product,
)


def _random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_eval_frechet_matches_diagonal_closed_form() -> None:
    # For diagonal covariances sqrt(S1 S2) is diagonal: d = |dmu|^2 + sum (sqrt(a) - sqrt(b))^2.
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.1, 3.0, 16), rng.uniform(0.1, 3.0, 16)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    expected = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    got = frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(expected, rel=1e-10)


def test_eval_frechet_matches_scipy_sqrtm_on_random_gaussians() -> None:
    rng = np.random.default_rng(1)
    for d in (3, 10, 32):
        s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        covmean = scipy.linalg.sqrtm(s1 @ s2).real
        expected = float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
        # A distance is symmetric in its arguments.
        assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-8)


def test_eval_frechet_identical_sets_are_zero_even_when_covariance_is_singular() -> None:
    rng = np.random.default_rng(2)
    # 10 samples in 64 dimensions: rank-9 covariance, where sqrtm-based code needs an eps retry.
    feats = rng.normal(size=(10, 64)) * 5 + 3
    assert frechet_distance_features(feats, feats.copy()) == pytest.approx(0.0, abs=1e-8)
    # Unclipped too: tr((S S)^(1/2)) = tr(S), so round-off of the 54 zero eigenvalues must
    # not leak in (their square roots would add ~1e-6 here).
    cov = fit_gaussian(feats).cov
    assert trace_sqrt_product(cov, cov) == pytest.approx(np.trace(cov), rel=1e-12)
    other = rng.normal(size=(10, 64)) * 5 + 3
    d = frechet_distance_features(feats, other)
    assert math.isfinite(d) and d > 1.0


def test_eval_frechet_from_features_small_sets_match_the_covariance_form() -> None:
    # N < D takes the N1 x N2 singular-value path; it must equal the D x D computations.
    rng = np.random.default_rng(4)
    mix = rng.normal(size=(64, 64)) / 8
    f1, f2 = rng.normal(size=(20, 64)) @ mix, rng.normal(size=(30, 64)) @ mix + 0.3
    g1, g2 = fit_gaussian(f1), fit_gaussian(f2)
    expected = frechet_distance(g1.mean, g1.cov, g2.mean, g2.cov)
    assert frechet_distance_features(f1, f2) == pytest.approx(expected, rel=1e-9)
    covmean = scipy.linalg.sqrtm(g1.cov @ g2.cov).real
    scipy_value = ((g1.mean - g2.mean) ** 2).sum() + np.trace(g1.cov) + np.trace(g2.cov) - 2 * np.trace(covmean)
    assert frechet_distance_features(f1, f2) == pytest.approx(scipy_value, rel=1e-6)
    # N > D takes the covariance path.
    big1, big2 = rng.normal(size=(100, 8)), rng.normal(size=(90, 8)) * 2
    h1, h2 = fit_gaussian(big1), fit_gaussian(big2)
    assert frechet_distance_features(big1, big2) == pytest.approx(
        frechet_distance(h1.mean, h1.cov, h2.mean, h2.cov), rel=1e-12)
    with pytest.raises(ValueError, match="at least 2 samples"):
        frechet_distance_features(f1[:1], f2)


def test_eval_frechet_equal_covariances_leave_mean_term() -> None:
    rng = np.random.default_rng(3)
    s = _random_spd(rng, 8)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    assert frechet_distance(mu1, s, mu2, s) == pytest.approx(float(((mu1 - mu2) ** 2).sum()), rel=1e-8)


def test_eval_fit_gaussian_and_input_errors() -> None:
    feats = np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 8.0]])
    g = fit_gaussian(feats)
    np.testing.assert_allclose(g.mean, [2.0, 4.0])
    np.testing.assert_allclose(g.cov, np.cov(feats.T))
    with pytest.raises(ValueError, match="at least 2 samples"):
        fit_gaussian(feats[:1], "generated FVD features")
    with pytest.raises(ValueError, match="NaN"):
        fit_gaussian(np.array([[0.0, np.nan], [1.0, 2.0]]))
    with pytest.raises(ValueError, match="covariances must be"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(3))


def test_eval_f_consistency_on_known_embeddings() -> None:
    first = torch.tensor([1.0, 0.0])
    # Frames 2..5 at cosine 1, 0, 1, 0 to frame 1; frames 6..7 at cosine -1.
    frames = torch.stack([first, first * 3, torch.tensor([0.0, 2.0]), first, torch.tensor([0.0, 1.0]),
                          -first, -first])
    assert f_consistency(frames, 4) == pytest.approx(50.0)
    assert f_consistency(frames, None) == pytest.approx(100 * (1 + 0 + 1 + 0 - 1 - 1) / 6)
    # Fewer frames than k: all the others are used.
    assert f_consistency(frames[:3], 4) == pytest.approx(50.0)
    static = first.repeat(8, 1)
    assert f_consistency(static, 4) == pytest.approx(100.0)
    with pytest.raises(ValueError, match="T >= 2"):
        f_consistency(first[None], 4)
