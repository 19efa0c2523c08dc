"""A deterministic synthetic WebVid-format dataset: moving coloured shapes with captions.

The demo and the tests need videos whose motion is obvious, whose caption says what
happens ("a red circle moving left"), and which a tiny model can learn on a CPU in
minutes. Each video is one shape (circle or square) of one of four colours crossing a
plain dark background in one of four directions over the whole clip. The same seed
gives the same CSV and the same mp4 bytes, so nothing binary needs to live in git.

Layout written under `out/`:
    results.csv                       WebVid columns + shape, color, direction
    videos/<page_dir>/<videoid>.mp4   MPEG-4 Part 2 (deterministic bytes)
    holdout/<i>.png + holdout/captions.csv   first frames of extra, unseen videos
    holdout/<i>.mp4                   those videos whole: what a sample of <i>.png should show
    holdout/results.csv               the same videos as a WebVid-format CSV (a validation set)

Beside them, `write_synthetic_dataset` writes latent shard sets of chosen shapes and
(uneven) shard sizes straight through the shard contract's writer
(`trip.data.shards.ShardWriter`), for the loader's tests and benchmarks: the loader is
then tested against the very bytes preprocessing produces.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import av
import numpy as np
from PIL import Image

from trip.data.shards import ShardInfo, ShardWriter, build_index, write_index

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 235), "yellow": (235, 215, 40),
}
SHAPES = ("circle", "square")
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
BACKGROUND = (18, 18, 24)
CSV_COLUMNS = ["videoid", "contentUrl", "duration", "page_dir", "name", "shape", "color", "direction"]


@dataclass(frozen=True)
class ShapeMotion:
    """What one synthetic video shows."""

    shape: str
    color: str
    direction: str
    cross: float  # position across the motion axis, as a fraction of the frame

    @property
    def caption(self) -> str:
        return f"a {self.color} {self.shape} moving {self.direction}"


def frame_hw(size: int | Sequence[int]) -> tuple[int, int]:
    """(height, width) of a frame size: an int s is square (s, s), a pair is (height, width)."""
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


def draw_motion(motion: ShapeMotion, size: int | Sequence[int], num_frames: int) -> np.ndarray:
    """Render the clip: uint8 [T, H, W, 3] (`size` an int S: S x S; or (H, W), landscape or
    portrait); the shape, sized by the short side, travels 0.2 -> 0.8 of the frame."""
    height, width = frame_hw(size)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    radius = 0.14 * min(height, width)
    dx, dy = DIRECTIONS[motion.direction]
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        along = 0.2 + 0.6 * t / max(num_frames - 1, 1)
        pos = along if (dx + dy) > 0 else 1.0 - along
        cx, cy = (pos, motion.cross) if dx else (motion.cross, pos)
        cx, cy = cx * width, cy * height
        if motion.shape == "circle":
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2
        else:
            mask = (np.abs(xx - cx) <= radius) & (np.abs(yy - cy) <= radius)
        frames[t] = BACKGROUND
        frames[t][mask] = COLORS[motion.color]
    return frames


def write_video(frames: np.ndarray, path: str, fps: int = 8, codec: str = "mpeg4") -> str:
    """uint8 [T, H, W, 3] -> mp4 at `path` (even H and W); written under a temporary name.

    `codec` "mpeg4" (default) gives reproducible bytes; "libx264" gives WebVid-like H.264.
    """
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.partial")
    os.makedirs(os.path.dirname(tmp), exist_ok=True)
    with av.open(tmp, mode="w", format="mp4") as container:
        # FFmpeg's own MPEG-4 Part 2 encoder, one thread: the same frames always give the same
        # bytes (libx264 was seen to differ in rare runs even with one thread)
        stream = container.add_stream(codec, rate=Fraction(fps))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1
        if codec == "libx264":
            stream.options = {"crf": "18", "preset": "fast"}
        else:
            stream.bit_rate = 4_000_000  # far above need at these sizes: near-lossless shapes
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)  # explicit: rate control reads them
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    os.replace(tmp, path)
    return path


def iso_duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"PT{s // 3600:02d}H{s % 3600 // 60:02d}M{s % 60:02d}S"


# With motion="by_color" each colour always moves the same way, so the first frame alone
# tells where the video goes: an image-to-video model without a text encoder (the CPU
# demo) can learn it, and a person can check the samples ("red always moves right").
COLOR_DIRECTIONS: dict[str, str] = {"red": "right", "green": "left", "blue": "up", "yellow": "down"}


def _motions(num: int, seed: int, motion: str = "random") -> list[ShapeMotion]:
    """Balanced over every (shape, colour, direction) combination, then shuffled by seed;
    with motion="by_color" the direction follows the colour (COLOR_DIRECTIONS)."""
    if motion not in ("random", "by_color"):
        raise ValueError(f"motion must be 'random' or 'by_color', got {motion!r}")
    rng = np.random.default_rng(seed)
    combos = [(s, c, d) for s in SHAPES for c in COLORS for d in DIRECTIONS
              if motion == "random" or COLOR_DIRECTIONS[c] == d]
    out: list[ShapeMotion] = []
    while len(out) < num:
        for i in rng.permutation(len(combos)):
            s, c, d = combos[i]
            out.append(ShapeMotion(s, c, d, float(rng.uniform(0.3, 0.7))))
    return out[:num]


def make_dataset(out: str, num: int = 48, seed: int = 0, size: int | Sequence[int] = 64, seconds: float = 4.0,
                 fps: int = 8, holdout: int = 4, motion: str = "random",
                 variants: Sequence[tuple[int | Sequence[int], float]] | None = None) -> str:
    """Write the dataset under `out`; returns the CSV path. Deterministic in its arguments.

    `size`: an int S (S x S frames) or (height, width). `variants`: (size, seconds) pairs that
    video i takes in turn (i mod len), for a corpus of landscape, portrait and square clips of
    several lengths; the hold-out videos keep `size` and `seconds`."""
    shapes = [(size, seconds)] if variants is None else [(v_size, float(v_seconds)) for v_size, v_seconds in variants]
    if not shapes:
        raise ValueError("variants must hold at least one (size, seconds) pair")
    for v_size, _ in [*shapes, (size, seconds)]:
        if any(side % 2 for side in frame_hw(v_size)):
            raise ValueError(f"size must be even for yuv420p video, got {v_size}")
    motions = _motions(num + holdout, seed, motion)
    rows = []
    for i, motion in enumerate(motions[:num]):
        v_size, v_seconds = shapes[i % len(shapes)]
        videoid, page_dir = str(1_000_000 + i), f"{i // 100:06d}_synth"
        path = os.path.join(out, "videos", page_dir, f"{videoid}.mp4")
        write_video(draw_motion(motion, v_size, max(2, round(v_seconds * fps))), path, fps=fps)
        rows.append({"videoid": videoid, "contentUrl": os.path.abspath(path),
                     "duration": iso_duration(v_seconds), "page_dir": page_dir, "name": motion.caption,
                     "shape": motion.shape, "color": motion.color, "direction": motion.direction})
    csv_path = os.path.join(out, "results.csv")
    write_csv(csv_path, rows)
    _write_holdout(os.path.join(out, "holdout"), motions[num:], size, max(2, round(seconds * fps)), fps)
    return csv_path


def write_csv(path: str, rows: list[dict[str, str]], columns: list[str] | None = None) -> str:
    """Write WebVid-style rows (atomically: a temp file, then a rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".partial"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns or CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
    return path


def _write_holdout(folder: str, motions: list[ShapeMotion], size: int | Sequence[int], num_frames: int,
                   fps: int) -> None:
    """First frames of videos not in the CSV, for sampling: <i>.png + captions.csv, and each
    whole video as <i>.mp4, the reference a sample from that frame is scored against."""
    if not motions:
        return
    os.makedirs(folder, exist_ok=True)
    rows, webvid = [], []
    for i, motion in enumerate(motions):
        name, video = f"{i:03d}.png", os.path.join(folder, f"{i:03d}.mp4")
        frames = draw_motion(motion, size, num_frames)
        Image.fromarray(frames[0]).save(os.path.join(folder, name))
        write_video(frames, video, fps=fps)
        rows.append({"file": name, "caption": motion.caption})
        webvid.append({"videoid": f"{i:03d}", "contentUrl": os.path.abspath(video),
                       "duration": iso_duration(num_frames / fps), "page_dir": "holdout", "name": motion.caption,
                       "shape": motion.shape, "color": motion.color, "direction": motion.direction})
    write_csv(os.path.join(folder, "captions.csv"), rows, columns=["file", "caption"])
    write_csv(os.path.join(folder, "results.csv"), webvid)


# --------------------------------------------------------------------------- latent shard sets


def sample_key(shard: int, ordinal: int) -> str:
    return f"s{shard:04d}_{ordinal:05d}"


def _synthetic_shard(prefix: str, s: int, n: int, latent_shape: Sequence[int], text_shape: Sequence[int] | None,
                     rng: np.random.Generator, bucket: str | None = None) -> ShardInfo:
    """Shard number `s` of n random samples, each marked with (s, ordinal) as described in
    `write_synthetic_dataset`; committed, its record returned."""
    writer = ShardWriter(prefix, s, bucket=bucket)
    for i in range(n):
        lat = rng.standard_normal(tuple(latent_shape)).astype(np.float16)
        lat[0, 0, 0, 0], lat[0, 0, 0, 1] = s, i
        text = rng.standard_normal(tuple(text_shape)).astype(np.float16) if text_shape else None
        key = sample_key(s, i)
        writer.add(key, lat, {"videoid": key, "caption": f"caption {key}"}, f"caption {key}", text)
    return writer.commit()


def write_synthetic_dataset(prefix: str, shard_sizes: Sequence[int], *,
                            latent_shape: Sequence[int] = (4, 3, 4, 4),
                            text_shape: Sequence[int] | None = (5, 8), seed: int = 0) -> dict[str, Any]:
    """Write shards of random latents (+ text states) and index.json under `prefix`.

    Sample `sample_key(s, i)` carries its identity in its latents: frame 0, channel 0 holds
    s at pixel (0, 0) and i at pixel (0, 1) (exact in float16 below 2048), so a test can
    check that every delivered tensor belongs to its key.
    Returns the index dict.
    """
    rng = np.random.default_rng(seed)
    infos = [_synthetic_shard(prefix, s, n, latent_shape, text_shape, rng) for s, n in enumerate(shard_sizes)]
    index = build_index(infos, latent_shape=list(latent_shape),
                        text_shape=list(text_shape) if text_shape else None,
                        codec={"kind": "synthetic", "scaling_factor": 1.0}, text_encoder=None)
    write_index(prefix, index)
    return index


def write_synthetic_buckets(prefix: str, buckets: dict[str, tuple[Sequence[int], Sequence[int]]], *,
                            text_shape: Sequence[int] | None = (5, 8), seed: int = 0) -> dict[str, Any]:
    """A bucketed shard set: `buckets` maps a bucket name to (latent_shape, shard sizes).

    Shards are numbered across buckets in the order given (`<bucket>/shard-NNNNNN.tar`), and
    samples carry their identity as in `write_synthetic_dataset` (shard number, ordinal).
    Returns the index dict."""
    rng = np.random.default_rng(seed)
    infos, specs, s = [], [], 0
    for name, (latent_shape, sizes) in buckets.items():
        specs.append({"name": name, "height": None, "width": None, "frames": int(latent_shape[0]),
                      "latent_shape": list(latent_shape)})
        for n in sizes:
            infos.append(_synthetic_shard(prefix, s, n, latent_shape, text_shape, rng, bucket=name))
            s += 1
    index = build_index(infos, latent_shape=specs[0]["latent_shape"],
                        text_shape=list(text_shape) if text_shape else None,
                        codec={"kind": "synthetic", "scaling_factor": 1.0}, text_encoder=None, buckets=specs)
    write_index(prefix, index)
    return index
