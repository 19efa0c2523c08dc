"""Frechet distance between feature Gaussians: the mathematics behind FVD and FID.

FVD and FID are the same formula on different features (I3D per clip, Inception per
frame): fit a Gaussian (mean, covariance) to each set and take

    d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).

The usual implementation calls `scipy.linalg.sqrtm(S1 @ S2)`, which is a general
(non-symmetric) square root: it can return complex parts and needs an eps-offset retry
when the product is near-singular (always the case when there are fewer samples than
feature dimensions). We use the symmetric form instead: with R = S1^(1/2),
tr((S1 S2)^(1/2)) = tr((R S2 R)^(1/2)), and R S2 R is symmetric positive semi-definite,
so its trace-sqrt is the sum of the square roots of its (clipped) eigenvalues. Two
`eigh` calls, no complex numbers, no eps retry, exact for singular covariances.

With fewer samples than dimensions (a quick FID over 100 frames of 2048-d features)
the D x D matrices are not needed at all: with centred, scaled features A [N1, D] and
B [N2, D] (S1 = A^T A, S2 = B^T B), the nonzero eigenvalues of S1 S2 are those of
(A B^T)(A B^T)^T, so tr((S1 S2)^(1/2)) is the sum of the singular values of the small
N1 x N2 matrix A B^T. `frechet_distance_features` takes that path when it is cheaper.
Everything runs in float64: the result is a small difference of large traces.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Gaussian:
    """Mean [D] and covariance [D, D] of a feature set (float64), with its sample count."""

    mean: np.ndarray
    cov: np.ndarray
    count: int


def _checked(features: np.ndarray, what: str) -> np.ndarray:
    """`features` as float64 [N >= 2, D], or a ValueError saying what is wrong."""
    feats = np.asarray(features, dtype=np.float64)
    if feats.ndim != 2:
        raise ValueError(f"{what} must be [N, D], got shape {feats.shape}")
    if feats.shape[0] < 2:
        raise ValueError(f"{what}: a covariance needs at least 2 samples, got {feats.shape[0]}")
    if not np.isfinite(feats).all():
        raise ValueError(f"{what} contain NaN or Inf values")
    return feats


def fit_gaussian(features: np.ndarray, what: str = "features") -> Gaussian:
    """Mean and unbiased covariance of `features` [N, D] (N >= 2)."""
    feats = _checked(features, what)
    return Gaussian(feats.mean(axis=0), np.cov(feats, rowvar=False).reshape(feats.shape[1], -1),
                    int(feats.shape[0]))


def trace_sqrt_product(cov1: np.ndarray, cov2: np.ndarray) -> float:
    """tr((cov1 @ cov2)^(1/2)) for symmetric PSD [D, D] matrices, via the symmetric form.

    With cov1 = V diag(l) V^T, R S2 R (R = cov1^(1/2)) is similar to
    diag(sqrt l) V^T S2 V diag(sqrt l), so one eigh, two matmuls and one eigvalsh suffice.
    """
    cov1, cov2 = np.asarray(cov1, dtype=np.float64), np.asarray(cov2, dtype=np.float64)
    vals, vecs = np.linalg.eigh((cov1 + cov1.T) / 2.0)
    root = np.sqrt(_drop_roundoff(vals))
    inner = (vecs.T @ cov2 @ vecs) * root[:, None] * root[None, :]
    eig = np.linalg.eigvalsh((inner + inner.T) / 2.0)
    return float(np.sqrt(_drop_roundoff(eig)).sum())


def _drop_roundoff(eigenvalues: np.ndarray) -> np.ndarray:
    """Zero the eigenvalues that are round-off (the usual matrix-rank tolerance).

    A rank-deficient covariance (fewer samples than dimensions) has exact zeros that
    eigh returns as +-1e-16-sized noise; their square roots (~1e-8 each, hundreds of
    them) would otherwise bias the trace. Negative values are round-off too.
    """
    tol = max(float(np.abs(eigenvalues).max(initial=0.0)), 0.0) * eigenvalues.shape[0] * np.finfo(np.float64).eps
    return np.where(eigenvalues > tol, eigenvalues, 0.0)


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """Squared Frechet (2-Wasserstein) distance between N(mu1, cov1) and N(mu2, cov2).

    mu: [D]; cov: [D, D] symmetric PSD. Returns a float >= 0 (tiny negative round-off is
    clipped to 0, so identical inputs give exactly 0 or a value at float64 precision).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise ValueError(f"means must be [D] of equal size, got {mu1.shape} and {mu2.shape}")
    d = mu1.shape[0]
    if cov1.shape != (d, d) or cov2.shape != (d, d):
        raise ValueError(f"covariances must be [{d}, {d}], got {cov1.shape} and {cov2.shape}")
    diff = mu1 - mu2
    value = diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * trace_sqrt_product(cov1, cov2)
    return max(float(value), 0.0)


def _centred(features: np.ndarray, what: str) -> np.ndarray:
    """(X - mean) / sqrt(N - 1), so that A^T A is the unbiased covariance; [N, D] float64."""
    feats = _checked(features, what)
    return (feats - feats.mean(axis=0)) / np.sqrt(feats.shape[0] - 1)


def frechet_distance_features(feats1: np.ndarray, feats2: np.ndarray) -> float:
    """Frechet distance between the Gaussians fitted to two feature sets [N1, D] and [N2, D]."""
    f1, f2 = np.asarray(feats1, dtype=np.float64), np.asarray(feats2, dtype=np.float64)
    if f1.ndim == 2 and f2.ndim == 2 and f1.shape[1] == f2.shape[1] and max(len(f1), len(f2)) <= f1.shape[1]:
        a, b = _centred(f1, "first feature set"), _centred(f2, "second feature set")
        diff = f1.mean(axis=0) - f2.mean(axis=0)
        trace_sqrt = float(np.linalg.svd(a @ b.T, compute_uv=False).sum())
        value = diff @ diff + (a * a).sum() + (b * b).sum() - 2.0 * trace_sqrt
        return max(float(value), 0.0)
    g1, g2 = fit_gaussian(f1, "first feature set"), fit_gaussian(f2, "second feature set")
    return frechet_distance(g1.mean, g1.cov, g2.mean, g2.cov)
