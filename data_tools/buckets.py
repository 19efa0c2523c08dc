"""Which bucket (height x width x frames) a clip goes to in a multi-shape preprocessing job.

`preprocess.buckets` lists the shapes a dataset may hold (trip/data/shards.py: every shard
holds one bucket's samples). A clip goes to one bucket, chosen by `assign_bucket` from what
the decoder sees of it: its displayed width and height (after the rotation metadata) and
how many frames it yields at the sampling spec (fps or frame_stride, from start_offset):

1. only buckets whose frame count the clip can fill are candidates;
2. among them, the nearest aspect ratio in log distance, |log(W/H) - log(W_b/H_b)|;
3. at that aspect, the longest frame count, then the larger pixel count (then config order);
4. the clip fits none when no bucket's frames fit, or when that nearest aspect would crop
   more than `max_crop` of its pixels. Cover-resize + centre-crop to a bucket of aspect a_b
   keeps min(a, a_b) / max(a, a_b) of a clip of aspect a, so it crops 1 - that.

The rule is pure (numbers in, a bucket or a reason out), so it is tested on its own; the
decoder (`data_tools.decode.decode_bucketed`) applies it to real videos.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from trip.config import PreprocessConfig
from trip.data.shards import bucket_name

_SAME_ASPECT = 1e-9  # log-aspect distances closer than this are a tie


@dataclass(frozen=True)
class BucketShape:
    """One bucket: frames of height x width pixels, `frames` of them."""

    height: int
    width: int
    frames: int

    @property
    def name(self) -> str:
        return bucket_name(self.height, self.width, self.frames)

    @property
    def aspect(self) -> float:
        """width / height"""
        return self.width / self.height

    @property
    def pixels(self) -> int:
        return self.height * self.width


@dataclass(frozen=True)
class Assignment:
    """A clip's bucket, or None with the reason it fits none; `crop`: fraction of its pixels cut."""

    bucket: BucketShape | None
    reason: str = ""
    crop: float = 0.0


def config_buckets(pre: PreprocessConfig) -> list[BucketShape] | None:
    """The job's buckets in config order, or None for an unbucketed job."""
    shapes = pre.bucket_shapes()
    return None if shapes is None else [BucketShape(*s) for s in shapes]


def crop_fraction(aspect: float, bucket_aspect: float) -> float:
    """Fraction of a clip's pixels that cover-resize + centre-crop to another aspect cuts away."""
    return 1.0 - min(aspect, bucket_aspect) / max(aspect, bucket_aspect)


def sampling_words(fps: float | None, frame_stride: int | None, start_offset: float = 0.0) -> str:
    """'at 4 fps' / 'at stride 2', plus ' from 1.5s' for an offset: how a reason says it."""
    how = f"at {fps:g} fps" if fps is not None else f"at stride {frame_stride}"
    return how + (f" from {start_offset:g}s" if start_offset else "")


def assign_bucket(width: int, height: int, frames: int, buckets: Sequence[BucketShape], *,
                  max_crop: float, sampling: str = "") -> Assignment:
    """The bucket of a clip of `width` x `height` (as displayed) that yields `frames` frames at
    the job's sampling (the rule in the module docstring); `sampling` words the reason
    ("at 4 fps", see `sampling_words`)."""
    if not buckets:
        raise ValueError("assign_bucket needs at least one bucket")
    if width < 1 or height < 1:
        return Assignment(None, f"frame size {width}x{height} (WxH) is empty")
    fitting = [b for b in buckets if b.frames <= frames]
    if not fitting:
        shortest = min(b.frames for b in buckets)
        got = f"{frames} frame{'s' if frames != 1 else ''} {sampling}".rstrip()
        return Assignment(None, f"{got}, the shortest bucket needs {shortest}")
    aspect = width / height

    def distance(b: BucketShape) -> float:
        return abs(math.log(aspect) - math.log(b.aspect))

    nearest = min(distance(b) for b in fitting)
    tied = [b for b in fitting if distance(b) - nearest <= _SAME_ASPECT]
    best = max(tied, key=lambda b: (b.frames, b.pixels))  # max keeps the first of equals: config order
    crop = crop_fraction(aspect, best.aspect)
    if crop > max_crop:
        return Assignment(None, f"aspect {aspect:.2f} (W/H): nearest bucket {best.name} ({best.aspect:.2f}) "
                                f"would crop {crop:.0%} > preprocess.bucket_max_crop={max_crop:g}", crop)
    return Assignment(best, crop=crop)
