"""`trip eval`: quality of a directory of generated clips, as a JSON report.

With `--reference`, each generated clip that has a reference clip of the same name (the
extension aside: `000.gif` pairs with `000.mp4`) is compared with it without any network
weights: PSNR, SSIM and, when the reference shows one moving object, the motion score
(`trip/eval/quality.py`). F-Consistency, FVD and FID need weights (below).

Either set may also be a latent shard set (a prefix with index.json): its clips are
decoded through the codec that wrote them (see trip/eval/shardset.py).

Which metrics run depends on the weights given: F-Consistency needs a CLIP directory; FVD
needs I3D weights and FID Inception weights, both with a reference directory. Every clip
is decoded once (uint8, so a few hundred clips fit in memory) and shared by all metrics.
FVD compares clips of equal length: all clips are cut to `--num-frames` (default: the
shortest clip), and a clip shorter than an explicit `--num-frames` is an error naming it.
The report is written atomically, so a reader never sees a half-written file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any

import numpy as np
import torch

from trip import storage
from trip.eval.frames import list_clips, read_clip
from trip.eval.frechet import frechet_distance_features


def _device(name: str | None) -> str:
    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def load_clips(root: str, num_frames: int | None, limit: int | None = None,
               codec_path: str | None = None) -> dict[str, np.ndarray]:
    """{clip name: uint8 frames [T, H, W, 3]} from a clip directory or a latent shard set."""
    from trip.eval.shardset import is_shard_set, load_shard_clips

    if is_shard_set(root):
        clips = load_shard_clips(root, limit=limit, codec_path=codec_path, num_frames=num_frames)
    else:
        clips = {os.path.basename(p): read_clip(p, max_frames=num_frames) for p in list_clips(root)[:limit]}
    for name, frames in clips.items():
        if num_frames is not None and frames.shape[0] < num_frames:
            raise ValueError(f"video {storage.join(root, name)} has {frames.shape[0]} frames, "
                             f"fewer than --num-frames {num_frames}")
    return clips


def _check_args(generated: str, reference: str | None, clip: str | None, i3d: str | None,
                inception: str | None) -> None:
    if (i3d or inception) and not reference:
        raise ValueError("FVD (--i3d) and FID (--inception) compare against --reference clips; give one")
    if not (clip or i3d or inception or reference):
        raise ValueError("nothing to compute: give --reference (PSNR, SSIM, motion), --clip "
                         "(F-Consistency) and/or --i3d/--inception with --reference (FVD/FID)")


def paired_quality(gen: dict[str, np.ndarray], ref: dict[str, np.ndarray],
                   reference_root: str) -> dict[str, dict[str, float]]:
    """{generated clip: PSNR/SSIM/motion figures} for every generated clip whose name, less
    its extension, names a reference clip too."""
    from trip.eval.quality import clip_quality

    by_stem = {os.path.splitext(name)[0]: name for name in ref}
    out = {}
    for name, frames in gen.items():
        other = by_stem.get(os.path.splitext(name)[0])
        if other is None:
            continue
        try:
            out[name] = clip_quality(frames, ref[other])
        except ValueError as e:
            raise ValueError(f"{name} vs {storage.join(reference_root, other)}: {e}") from e
    return out


def _f_consistency(encoder: Any, clips: dict[str, np.ndarray]) -> tuple[dict[str, float], dict[str, dict]]:
    from trip.eval.fconsistency import video_f_consistency

    per_video = {name: video_f_consistency(encoder, frames) for name, frames in clips.items()}
    mean = {k: float(np.mean([v[k] for v in per_video.values()])) for k in ("f_consistency_4", "f_consistency_all")}
    return mean, per_video


def evaluate(generated: str, reference: str | None = None, *, clip: str | None = None,
             i3d: str | None = None, inception: str | None = None, num_frames: int | None = None,
             limit: int | None = None, codec_path: str | None = None, device: str | None = None,
             log=print) -> dict[str, Any]:
    """Compute every metric the given weights allow; returns the report as a dict."""
    _check_args(generated, reference, clip, i3d, inception)
    device = _device(device)
    t0 = time.perf_counter()
    gen = load_clips(generated, num_frames, limit, codec_path)
    ref = load_clips(reference, num_frames, limit, codec_path) if reference else {}
    frames = num_frames or min(c.shape[0] for c in [*gen.values(), *ref.values()])
    if frames < 2:
        raise ValueError(f"clips need at least 2 frames for any metric, got {frames}")
    gen = {k: v[:frames] for k, v in gen.items()}
    ref = {k: v[:frames] for k, v in ref.items()}
    log(f"eval: {len(gen)} generated and {len(ref)} reference clips of {frames} frames ({device})")
    report: dict[str, Any] = {
        "generated": generated, "reference": reference, "num_generated": len(gen),
        "num_reference": len(ref), "num_frames": frames, "device": device,
        "networks": {"clip": clip, "i3d": i3d, "inception": inception},
        "metrics": {}, "reference_metrics": {}, "per_video": {},
    }
    if ref:
        from trip.eval.quality import summarize

        quality = paired_quality(gen, ref, reference or "")
        report["paired"] = len(quality)
        if quality:
            report["metrics"].update(summarize(quality))
            for name, figures in quality.items():
                report["per_video"].setdefault(name, {}).update(figures)
        elif not (clip or i3d or inception):
            raise ValueError(f"no generated clip in {generated} has a reference of the same name in "
                             f"{reference}: PSNR, SSIM and motion compare clips pairwise")
    if clip:
        from trip.eval.fconsistency import ClipImageEncoder

        encoder = ClipImageEncoder(clip, device=device)
        mean, per_video = _f_consistency(encoder, gen)
        report["metrics"].update(mean)
        for name, figures in per_video.items():
            report["per_video"].setdefault(name, {}).update(figures)
        if ref:  # the ceiling the generated clips should approach
            report["reference_metrics"].update(_f_consistency(encoder, ref)[0])
    if i3d or inception:
        from trip.eval.features import clip_features, frame_features, load_feature_net

        if i3d:
            net = load_feature_net(i3d, "i3d", device)
            report["metrics"]["fvd"] = frechet_distance_features(
                clip_features(net, list(gen.values())), clip_features(net, list(ref.values())))
        if inception:
            net = load_feature_net(inception, "inception", device)
            report["metrics"]["fid"] = frechet_distance_features(
                frame_features(net, list(gen.values())), frame_features(net, list(ref.values())))
    report["seconds"] = round(time.perf_counter() - t0, 3)
    return report


def format_table(report: dict[str, Any]) -> str:
    """A short human-readable table of the dataset-level metrics."""
    rows = [("metric", "generated", "reference")]
    for key, value in report["metrics"].items():
        ref = report["reference_metrics"].get(key)
        rows.append((key, f"{value:.3f}", "-" if ref is None else f"{ref:.3f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def main(args: argparse.Namespace) -> int:
    """Entry point of `trip eval` (argument parsing lives in trip/cli.py)."""
    try:
        report = evaluate(args.generated, args.reference, clip=args.clip, i3d=args.i3d,
                          inception=args.inception, num_frames=getattr(args, "num_frames", None),
                          limit=getattr(args, "limit", None), codec_path=getattr(args, "codec", None),
                          device=getattr(args, "device", None))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    bad = [k for k, v in report["metrics"].items() if not math.isfinite(v)]
    storage.write_bytes_atomic(args.out, (json.dumps(report, indent=2) + "\n").encode())
    print(format_table(report))
    print(f"report: {args.out}")
    if bad:
        print(f"error: non-finite metrics {bad}", file=sys.stderr)
        return 1
    return 0
