"""Frechet distance: our symmetric eigen form vs the usual `scipy.linalg.sqrtm(S1 @ S2)`.

FVD/FID over a real evaluation set spends its non-network time here, at D = 400 (I3D
logits) and D = 2048 (Inception pool; 1024 by default to keep `make bench` short). Two figures per size, each against the scipy
formula measured in the same run:
- seconds per distance (ratio < 1: ours is faster);
- error on identical feature sets with fewer samples than dimensions (the true distance
  is 0; singular covariances are where sqrtm-based code needs its eps retry). The ratio
  is our |error| over scipy's |error| (< 1: ours is closer to the truth);
- seconds for small sets (N = D/4) given as features, where ours skips the D x D path.

    python -m bench.eval_frechet [--sizes 400,1024,2048] [--iters 2]
"""

from __future__ import annotations

import argparse

import numpy as np
import scipy.linalg

from bench.common import print_table, row, time_pair
from trip.eval.frechet import (
    fit_gaussian,
    frechet_distance,
    frechet_distance_features,
    trace_sqrt_product,
)


def scipy_frechet(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """The formula as commonly implemented (sqrtm of the product, eps retry when singular)."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * 1e-6
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    covmean = np.real(covmean)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def measure(dim: int, iters: int) -> list[dict]:
    rng = np.random.default_rng(dim)
    # Correlated features, as network features are; 2x more samples than dimensions.
    mix = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    g1 = fit_gaussian(rng.normal(size=(2 * dim, dim)) @ mix)
    g2 = fit_gaussian(rng.normal(size=(2 * dim, dim)) @ mix + 0.1)
    t_ours, t_scipy = time_pair(lambda: frechet_distance(g1.mean, g1.cov, g2.mean, g2.cov),
                                lambda: scipy_frechet(g1.mean, g1.cov, g2.mean, g2.cov),
                                warmup=1, iters=iters)
    # Identical sets with N < D: rank-deficient covariance, exact answer 0.
    few = fit_gaussian(rng.normal(size=(dim // 4, dim)) @ mix)
    # Unclipped (frechet_distance clips round-off below 0), so both sides are judged alike.
    err_ours = abs(2.0 * np.trace(few.cov) - 2.0 * trace_sqrt_product(few.cov, few.cov))
    err_scipy = abs(scipy_frechet(few.mean, few.cov, few.mean, few.cov))
    scale = float(np.trace(few.cov))
    print(f"[D={dim}] {t_ours * 1e3:.1f} ms vs scipy {t_scipy * 1e3:.1f} ms; identical-set error "
          f"{err_ours:.3g} vs {err_scipy:.3g} (trace {scale:.3g})")
    # Small sets (N = D/4 per side) from features: ours never forms a D x D matrix.
    fa, fb = rng.normal(size=(dim // 4, dim)) @ mix, rng.normal(size=(dim // 4, dim)) @ mix + 0.1

    def scipy_from_features() -> float:
        ga, gb = fit_gaussian(fa), fit_gaussian(fb)
        return scipy_frechet(ga.mean, ga.cov, gb.mean, gb.cov)

    t_small, t_small_scipy = time_pair(lambda: frechet_distance_features(fa, fb), scipy_from_features,
                                       warmup=1, iters=iters)
    print(f"[D={dim}] {dim // 4} vs {dim // 4} samples from features: {t_small * 1e3:.1f} ms vs "
          f"scipy {t_small_scipy * 1e3:.1f} ms")
    name = f"eval_frechet/D={dim}"
    return [row(name, "seconds per distance", t_ours, "scipy sqrtm(S1 S2)", t_scipy),
            row(name, "|error| identical sets, N<D", err_ours, "scipy sqrtm(S1 S2)", err_scipy),
            row(name, "seconds, N=D/4 from features", t_small, "scipy sqrtm(S1 S2)", t_small_scipy)]


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default="400,1024", help="comma-separated feature dimensions")
    ap.add_argument("--iters", type=int, default=2)
    args = ap.parse_args(argv)
    rows = []
    for dim in (int(d) for d in args.sizes.split(",")):
        rows += measure(dim, args.iters)
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
