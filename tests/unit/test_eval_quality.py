"""Weight-free quality metrics: PSNR, SSIM and the motion score."""

from __future__ import annotations

import math

import numpy as np
import pytest

from data_tools.synth import ShapeMotion, draw_motion
from trip.eval.quality import clip_quality, motion, psnr, ssim, summarize


def _moving(direction: str = "right", size: int = 32, frames: int = 8) -> np.ndarray:
    return draw_motion(ShapeMotion("square", "red", direction, 0.5), size, frames)


def _ssim_direct(a: np.ndarray, b: np.ndarray, size: int = 11, sigma: float = 1.5) -> float:
    """SSIM of two grey frames written out window by window (an independent computation)."""
    x = np.arange(size) - (size - 1) / 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    vals = []
    for i in range(a.shape[0] - size + 1):
        for j in range(a.shape[1] - size + 1):
            pa, pb = a[i:i + size, j:j + size], b[i:i + size, j:j + size]
            ma, mb = (w * pa).sum(), (w * pb).sum()
            va, vb = (w * (pa - ma) ** 2).sum(), (w * (pb - mb) ** 2).sum()
            cov = (w * (pa - ma) * (pb - mb)).sum()
            vals.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_psnr_of_a_known_pair():
    ref = np.full((3, 8, 8, 3), 100, np.uint8)
    gen = ref.copy()
    gen[1] += 10  # MSE 100 -> 10 log10(255^2 / 100)
    gen[2] += 1  # MSE 1
    p = psnr(gen, ref)
    assert p[0] == math.inf
    assert p[1] == pytest.approx(10 * math.log10(255**2 / 100))
    assert p[2] == pytest.approx(20 * math.log10(255))


def test_ssim_agrees_with_a_window_by_window_computation():
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, (2, 20, 24, 3), dtype=np.uint8)
    gen = np.clip(ref.astype(int) + rng.integers(-30, 31, ref.shape), 0, 255).astype(np.uint8)
    got = ssim(gen, ref)
    luma = lambda c: 0.299 * c[..., 0] + 0.587 * c[..., 1] + 0.114 * c[..., 2]  # noqa: E731
    want = [_ssim_direct(luma(gen[t].astype(float)), luma(ref[t].astype(float))) for t in range(2)]
    assert got == pytest.approx(want, abs=1e-9)
    assert ssim(ref, ref) == pytest.approx([1.0, 1.0])
    assert 0 < got.mean() < 1


def test_motion_of_the_reference_itself_is_ratio_1_and_no_direction_error():
    ref = _moving("right")
    m = motion(ref, ref)
    assert m.ratio == pytest.approx(1.0)
    assert m.direction_error_deg == pytest.approx(0.0, abs=1e-6)
    assert m.reference_px == pytest.approx(0.6 * 32, rel=0.05)  # the shape crosses 0.2 -> 0.8


def test_a_still_clip_scores_about_zero_and_a_reversed_one_negative():
    ref = _moving("down")
    still = np.repeat(ref[:1], len(ref), axis=0)
    assert motion(still, ref).ratio == pytest.approx(0.0, abs=1e-6)
    reversed_ = motion(ref[::-1].copy(), ref)
    assert reversed_.ratio == pytest.approx(-1.0)
    assert reversed_.direction_error_deg == pytest.approx(180.0)
    sideways = motion(_moving("right"), _moving("up"))
    assert sideways.direction_error_deg == pytest.approx(90.0, abs=1.0)
    assert sideways.ratio == pytest.approx(0.0, abs=0.05)


def test_a_clip_where_the_object_vanishes_moves_zero_and_bad_shapes_are_named():
    ref = _moving("left")
    blank = np.repeat(ref[:1], len(ref), axis=0)
    blank[1:] = ref[0, 0, 0]  # background only after the first frame
    assert motion(blank, ref).ratio == 0.0 and math.isnan(motion(blank, ref).direction_error_deg)
    with pytest.raises(ValueError, match="no moving object"):
        motion(ref, np.repeat(ref[:1], len(ref), axis=0))
    with pytest.raises(ValueError, match="no object"):
        motion(ref, np.full_like(ref, 20))
    with pytest.raises(ValueError, match="resize one side"):
        psnr(ref[:, :16], ref)
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
        ssim(ref[..., 0], ref)


def test_noise_of_the_objects_colour_is_not_the_object():
    """An untrained model's output: the first frame, then noise. Noise has pixels of the
    object's colour all over the frame, whose centroid sits at the centre: that is not motion."""
    ref = _moving("right")
    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 256, ref.shape, dtype=np.uint8)
    noisy[0] = ref[0]
    m = motion(noisy, ref)
    assert m.ratio == 0.0 and m.generated_px == 0.0
    speckled = ref.copy()  # the object present and moving, with sparse salt noise: still found
    speckled[rng.random(ref.shape[:3]) < 0.02] = 255
    assert motion(speckled, ref).ratio == pytest.approx(1.0, abs=0.1)


def test_clip_quality_and_summary_are_plain_finite_numbers():
    ref = _moving("up")
    per = {"a": clip_quality(ref, ref), "b": clip_quality(ref[::-1].copy(), ref)}
    assert per["a"]["psnr"] == 100.0 and per["a"]["ssim"] == pytest.approx(1.0)
    s = summarize(per)
    assert s["displacement_ratio_min"] == pytest.approx(-1.0)
    assert all(isinstance(v, float) and math.isfinite(v) for v in s.values())
    still_ref = np.repeat(ref[:1], len(ref), axis=0)
    assert "displacement_ratio" not in clip_quality(ref, still_ref)  # no object motion to compare
