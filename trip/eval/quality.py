"""Weight-free quality of generated clips against reference clips: PSNR, SSIM and motion.

These need no network weights, so they run anywhere (CI, the demo, validation during
training) and are comparable across runs:

- `psnr` per frame, in dB over 8-bit values (identical frames: `inf`, capped at
  `PSNR_CAP` in averages so one perfect frame does not make a mean infinite);
- `ssim` per frame: Wang et al.'s structural similarity on the luma channel, an 11-tap
  Gaussian window (sigma 1.5), the usual constants for 8-bit data;
- `motion` for clips with one moving object on a plain background (the synthetic data):
  the object is what differs from the background (the median colour of the first frame's
  border) in the reference's first frame; in every frame of both clips it is found again
  by its colour, size and compactness (so noise or speckle of its colour spread over the
  frame does not count), its centroid is its position, and the clip's displacement is the
  last found centroid minus the first. Against a reference clip it reports the
  displacement ratio (the generated displacement projected on the reference's, divided by
  the reference's length: 1 for the same motion, ~0 for a still clip, negative for the
  opposite way) and the direction error (the angle between the two displacements, degrees).

Clips are uint8 arrays [T, H, W, 3].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

PSNR_CAP = 100.0  # dB: stands for "identical" in means
FOREGROUND_THRESHOLD = 48  # max channel difference from the background colour, 0-255
MIN_FOREGROUND_PIXELS = 4  # fewer than this: no object found in the frame


def _check_pair(generated: np.ndarray, reference: np.ndarray) -> None:
    for name, clip in (("generated", generated), ("reference", reference)):
        if clip.ndim != 4 or clip.shape[-1] != 3:
            raise ValueError(f"{name} clip must be [T, H, W, 3], got shape {tuple(clip.shape)}")
    if generated.shape[1:] != reference.shape[1:]:
        raise ValueError(f"generated frames are {generated.shape[1:3]} but reference frames are "
                         f"{reference.shape[1:3]}: resize one side first")


def psnr(generated: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per-frame PSNR in dB over the first min(T) frames (float64 [T]; inf where identical)."""
    _check_pair(generated, reference)
    n = min(len(generated), len(reference))
    diff = generated[:n].astype(np.float64) - reference[:n].astype(np.float64)
    mse = (diff**2).reshape(n, -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        return np.where(mse == 0, np.inf, 10 * np.log10(255.0**2 / np.maximum(mse, 1e-300)))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def _luma(clip: np.ndarray) -> torch.Tensor:
    """ITU-R BT.601 luma, float64 [T, 1, H, W] in 0-255."""
    rgb = torch.from_numpy(clip.astype(np.float64))
    y = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    return y[:, None]


def ssim(generated: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per-frame SSIM of the luma channel over the first min(T) frames (float64 [T], <= 1).

    Valid-region statistics (no padding): frames smaller than the 11-pixel window use a
    window of their smaller side (odd)."""
    _check_pair(generated, reference)
    n = min(len(generated), len(reference))
    a, b = _luma(generated[:n]), _luma(reference[:n])
    size = min(11, min(a.shape[-2:]) - (1 - min(a.shape[-2:]) % 2))
    w = _gaussian_window(size, 1.5 * size / 11)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_a, mu_b = F.conv2d(a, w), F.conv2d(b, w)
    var_a = F.conv2d(a * a, w) - mu_a**2
    var_b = F.conv2d(b * b, w) - mu_b**2
    cov = F.conv2d(a * b, w) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.mean(dim=(1, 2, 3)).numpy()


def background_color(clip: np.ndarray) -> np.ndarray:
    """The median colour of the first frame's one-pixel border (float [3])."""
    f = clip[0].astype(np.float64)
    border = np.concatenate([f[0], f[-1], f[1:-1, 0], f[1:-1, -1]])
    return np.median(border, axis=0)


@dataclass(frozen=True)
class TrackedObject:
    """What the object looks like in the reference's first frame: its colour, its area in
    pixels and its spatial spread (RMS distance of its pixels from their centroid)."""

    color: np.ndarray
    area: float
    spread: float

    @classmethod
    def from_reference(cls, reference: np.ndarray) -> TrackedObject:
        frame = reference[0].astype(np.float64)
        mask = np.abs(frame - background_color(reference)).max(axis=-1) > FOREGROUND_THRESHOLD
        if mask.sum() < MIN_FOREGROUND_PIXELS:
            raise ValueError("the reference clip's first frame shows no object against its background: "
                             "the motion score needs one")
        return cls(np.median(frame[mask], axis=0), float(mask.sum()), _spread(mask))

    def find(self, frame: np.ndarray) -> tuple[float, float] | None:
        """The object's centroid (x, y) in `frame`, or None when no pixel group of its colour,
        about its size (1/4x-4x) and about as compact (spread <= 2x + 1 px) is there: noise
        or speckle of the right colour spread over the frame is not the object."""
        mask = np.abs(frame.astype(np.float64) - self.color).max(axis=-1) <= FOREGROUND_THRESHOLD
        n = int(mask.sum())
        if n < max(MIN_FOREGROUND_PIXELS, self.area / 4) or n > self.area * 4:
            return None
        if _spread(mask) > 2 * self.spread + 1:
            return None
        ys, xs = np.nonzero(mask)
        return float(xs.mean() + 0.5), float(ys.mean() + 0.5)


def _spread(mask: np.ndarray) -> float:
    ys, xs = np.nonzero(mask)
    return float(np.sqrt(xs.var() + ys.var()))


def centroids(clip: np.ndarray, obj: TrackedObject) -> np.ndarray:
    """Per-frame centroid (x, y) in pixels of `obj` (float [T, 2]; NaN where it is not found)."""
    out = np.full((len(clip), 2), np.nan)
    for t, frame in enumerate(clip):
        found = obj.find(frame)
        if found is not None:
            out[t] = found
    return out


def displacement(clip: np.ndarray, obj: TrackedObject) -> np.ndarray:
    """Last minus first found centroid of `obj` (float [2], pixels; NaN when it is found in
    fewer than two frames)."""
    c = centroids(clip, obj)
    found = np.flatnonzero(~np.isnan(c[:, 0]))
    if len(found) < 2:
        return np.full(2, np.nan)
    return c[found[-1]] - c[found[0]]


@dataclass(frozen=True)
class Motion:
    """How a generated clip's object moved compared with the reference's."""

    generated_px: float  # length of the generated displacement
    reference_px: float  # length of the reference displacement
    ratio: float  # generated displacement projected on the reference's / reference length
    direction_error_deg: float  # angle between the two displacements (NaN if either is ~0)

    def as_dict(self) -> dict[str, float]:
        return {"displacement_px": self.generated_px, "reference_displacement_px": self.reference_px,
                "displacement_ratio": self.ratio, "direction_error_deg": self.direction_error_deg}


def motion(generated: np.ndarray, reference: np.ndarray) -> Motion:
    """Compare the object's motion in `generated` with `reference` (see the module docstring).

    The object is what the reference's first frame shows against its background; it is
    tracked in both clips by colour, size and compactness (`TrackedObject.find`)."""
    _check_pair(generated, reference)
    n = min(len(generated), len(reference))
    obj = TrackedObject.from_reference(reference)
    d_gen, d_ref = displacement(generated[:n], obj), displacement(reference[:n], obj)
    ref_len, gen_len = float(np.hypot(*d_ref)), float(np.hypot(*d_gen))
    if not math.isfinite(ref_len) or ref_len < 1e-6:
        raise ValueError("the reference clip shows no moving object against its background: "
                         "the motion score needs one")
    ratio = float(np.dot(d_gen, d_ref) / ref_len**2) if math.isfinite(gen_len) else 0.0
    if math.isfinite(gen_len) and gen_len > 1e-6:
        cos = float(np.clip(np.dot(d_gen, d_ref) / (gen_len * ref_len), -1.0, 1.0))
        angle = math.degrees(math.acos(cos))
    else:
        angle = math.nan
    return Motion(gen_len if math.isfinite(gen_len) else 0.0, ref_len, ratio, angle)


def clip_quality(generated: np.ndarray, reference: np.ndarray, with_motion: bool = True) -> dict[str, float]:
    """All weight-free figures of one generated clip against its reference, as plain finite
    floats: mean PSNR/SSIM, first- and last-frame PSNR, and the motion figures when asked
    and the reference shows a moving object (the direction error is left out when the
    generated clip does not move)."""
    p, s = psnr(generated, reference), ssim(generated, reference)
    capped = np.minimum(p, PSNR_CAP)
    out = {"psnr": float(capped.mean()), "psnr_first": float(capped[0]), "psnr_last": float(capped[-1]),
           "ssim": float(s.mean())}
    if with_motion:
        try:
            out.update((k, v) for k, v in motion(generated, reference).as_dict().items() if math.isfinite(v))
        except ValueError:
            pass  # a reference without one moving object: PSNR and SSIM only
    return out


def summarize(per_clip: dict[str, dict[str, float]]) -> dict[str, float]:
    """Means over clips of each figure (NaN-free figures only), plus the worst displacement
    ratio (the demo's target is about every clip)."""
    keys = sorted({k for v in per_clip.values() for k in v})
    out = {}
    for k in keys:
        vals = [v[k] for v in per_clip.values() if k in v and math.isfinite(v[k])]
        if vals:
            out[k] = float(np.mean(vals))
    ratios = [v["displacement_ratio"] for v in per_clip.values() if "displacement_ratio" in v]
    if ratios:
        out["displacement_ratio_min"] = float(min(ratios))
    return out
