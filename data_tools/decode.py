"""Video file -> a fixed-length, fixed-size clip (PyAV), or a reason why not.

A preprocessing job meets every kind of broken input in a few million WebVid files:
missing objects, zero-byte uploads, truncated mp4s, HTML error pages saved as .mp4,
clips shorter than the sampling window. None of that may crash the job: every such
case raises `SkipVideo` carrying a stage and a human-readable reason, which the job
writes to its errors manifest. A caller unsure of the file name (a .webm where the CSV
suggests .mp4) passes `fallbacks`: they are looked for here, only when the first is missing,
and the reason for a video found nowhere names every path tried. HTTP(S) URLs are downloaded by
`fetch` (by default a `data_tools.fetch.Fetcher` with its default policy: timeouts, retries,
a size cap); every URL in a reason or in the clip's meta is redacted (no query string, no
userinfo: signed URLs carry credentials there).

Sampling: F frames either at a target frame rate (frame k is the first source frame at
or after `start_offset + k / fps`, within half a source frame; a slow source repeats frames) or every `frame_stride`-th source frame from the
first frame at or after `start_offset`. Frames are resized by swscale (area filter), aspect
kept, to the smallest size that covers `resolution` (an int S: the short side becomes S; a
pair (H, W): the frame covers H x W), rotated upright by the stream's display matrix, and
centre-cropped to S x S or H x W: only the side in excess of the target's aspect is cut.

Buckets (`decode_bucketed`): a multi-shape job decodes each clip at the size and length of
the bucket its frames choose (`data_tools.buckets`), with the same cover resize and crop.

Output: uint8 numpy [F, H, W, 3] (RGB), chosen over float tensors because clips cross
process boundaries in Ray and uint8 is 4x smaller; `to_tensor` gives the float
[F, 3, H, W] in [0, 1] that the codecs take.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import IO, TYPE_CHECKING, Any

import av
import numpy as np

from data_tools.buckets import BucketShape, assign_bucket, sampling_words
from data_tools.fetch import Fetcher, FetchError, is_http, redact_url
from trip import storage
from trip.config import size_hw

if TYPE_CHECKING:
    import torch


class SkipVideo(Exception):
    """A video that cannot become a clip; `stage` is fetch, decode or bucket (it fits none of
    the job's buckets), `reason` says why."""

    def __init__(self, stage: str, reason: str) -> None:
        super().__init__(f"{stage}: {reason}")
        self.stage = stage
        self.reason = reason


@dataclass(frozen=True)
class SamplingSpec:
    """Which frames to take and at what size."""

    num_frames: int = 8
    fps: float | None = 4.0  # sample at this rate ...
    frame_stride: int | None = None  # ... or every n-th source frame
    start_offset: float = 0.0  # seconds
    resolution: int | tuple[int, int] = 32  # output is S x S, or H x W for a pair (height, width)
    threads: int = 1  # decoder threads (0: let FFmpeg choose)

    def __post_init__(self) -> None:
        if (self.fps is None) == (self.frame_stride is None):
            raise ValueError("set exactly one of fps and frame_stride")
        if self.num_frames < 1 or min(size_hw(self.resolution)) < 1:
            raise ValueError("num_frames and resolution must be >= 1")


@dataclass
class Clip:
    """A decoded clip. frames: uint8 [F, H, W, 3]."""

    frames: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)  # src fps/size, rotation, frame times


def to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 [F, H, W, 3] -> float [F, 3, H, W] in [0, 1]."""
    import torch  # not at module level: decode workers never need torch

    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255.0


def resized_size(width: int, height: int, resolution: int | tuple[int, int]) -> tuple[int, int]:
    """(w, h) of the smallest aspect-kept resize that covers `resolution` (S: the short side
    becomes S; (H, W): both w >= W and h >= H, one of them equal), so the centre crop to it
    cuts only the excess of one side."""
    out_h, out_w = size_hw(resolution)
    scale = max(out_h / height, out_w / width)  # = S / min(width, height) for a square target
    return max(out_w, round(width * scale)), max(out_h, round(height * scale))


def centre_crop(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """[h, w, 3] -> [H, W, 3] (an int S: [S, S, 3]) from the middle."""
    out_h, out_w = size_hw(size)
    h, w = image.shape[:2]
    top, left = (h - out_h) // 2, (w - out_w) // 2
    return image[top:top + out_h, left:left + out_w]


class _Missing(Exception):
    """No file at this URL (the caller may look for another); `reason`: why, when worth saying."""

    def __init__(self, reason: str = "") -> None:
        super().__init__(reason)
        self.reason = reason


Fetch = Callable[[str], bytes]


def _download(url: str, fetch: Fetch) -> bytes:
    try:
        return fetch(url)
    except FetchError as e:
        if e.status in (404, 410):
            raise _Missing(e.reason) from e
        raise SkipVideo("fetch", e.reason) from e


def _open_one(url: str, fetch: Fetch | None) -> str | IO[bytes]:
    """A path or file object for PyAV; raises `_Missing` when there is no such file."""
    if is_http(url):
        data = _download(url, fetch or Fetcher())
        if not data:
            raise SkipVideo("fetch", f"empty file (0 bytes): {redact_url(url)}")
        return io.BytesIO(data)
    path = storage.local_path(url)
    if path is not None:
        if not os.path.isfile(path):
            raise _Missing
        if os.path.getsize(path) == 0:
            raise SkipVideo("fetch", f"empty file (0 bytes): {url}")
        return path
    try:
        data = storage.retry(lambda: storage.read_bytes(url), what=f"download of {url}")
    except FileNotFoundError as e:
        raise _Missing from e
    except OSError as e:
        raise SkipVideo("fetch", f"cannot read {url}: {e}") from e
    if not data:
        raise SkipVideo("fetch", f"empty file (0 bytes): {url}")
    return io.BytesIO(data)


def _open_source(urls: Sequence[str], fetch: Fetch | None) -> tuple[str, str | IO[bytes]]:
    """The first of `urls` that exists and what PyAV reads it from; missing and empty files
    are skips, not errors."""
    missing = _Missing()
    for url in urls:
        try:
            return url, _open_one(url, fetch)
        except _Missing as e:
            missing = e
    if len(urls) == 1:
        raise SkipVideo("fetch", missing.reason or f"file not found: {redact_url(urls[0])}")
    raise SkipVideo("fetch", f"file not found, tried {len(urls)} paths: {', '.join(map(redact_url, urls))}")


def _frame_time(frame: av.VideoFrame, index: int, src_fps: float) -> float:
    return float(frame.time) if frame.time is not None else index / src_fps


def _select(frames: Iterator[av.VideoFrame], spec: SamplingSpec,
            src_fps: float) -> Iterator[tuple[av.VideoFrame, float]]:
    """Yield the chosen (frame, time) pairs in order; stops after num_frames."""
    tol = 0.5 / src_fps  # a frame within half a source period of the target counts as on time
    taken, since_start = 0, -1
    for i, frame in enumerate(frames):
        t = _frame_time(frame, i, src_fps)
        if t < spec.start_offset - tol:
            continue
        since_start += 1
        if spec.fps is not None:
            # a source slower than the target rate repeats frames, like ffmpeg's fps filter
            while taken < spec.num_frames and t >= spec.start_offset + taken / spec.fps - tol:
                yield frame, t
                taken += 1
        elif since_start % spec.frame_stride == 0:  # type: ignore[operator]
            yield frame, t
            taken += 1
        if taken == spec.num_frames:
            return


def _to_array(frame: av.VideoFrame, spec: SamplingSpec) -> np.ndarray:
    k = round((frame.rotation or 0) / 90) % 4  # display matrix angle is counter-clockwise
    out_h, out_w = size_hw(spec.resolution)
    stored = (out_w, out_h) if k % 2 else (out_h, out_w)  # the target as the stream stores it, before rotation
    w, h = resized_size(frame.width, frame.height, stored)
    rgb = frame.reformat(width=w, height=h, format="rgb24", interpolation="AREA").to_ndarray()
    if k:
        rgb = np.rot90(rgb, k)
    return np.ascontiguousarray(centre_crop(rgb, (out_h, out_w)))


def _open_stream(container: av.container.InputContainer, url: str, spec: SamplingSpec) -> tuple[Any, float]:
    """The container's first video stream, set up for decoding at `spec` and seeked near its
    start offset, and its frame rate (25 when the container does not say)."""
    if not container.streams.video:
        raise SkipVideo("decode", f"no video stream in {url}")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    stream.codec_context.thread_count = spec.threads
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    src_fps = float(rate) if rate else 25.0
    if spec.start_offset > 1.0 and stream.time_base:
        # jump to the keyframe before the offset instead of decoding everything before it
        container.seek(int(spec.start_offset / stream.time_base), stream=stream, backward=True)
    return stream, src_fps


def _decode_open(container: av.container.InputContainer, url: str, spec: SamplingSpec) -> Clip:
    stream, src_fps = _open_stream(container, url, spec)
    chosen, times, size, rotation = [], [], (0, 0), 0
    for frame, t in _select(container.decode(stream), spec, src_fps):
        chosen.append(_to_array(frame, spec))
        times.append(round(t, 4))
        size, rotation = (frame.width, frame.height), int(frame.rotation or 0)
    if len(chosen) < spec.num_frames:
        how = f"{spec.fps} fps" if spec.fps is not None else f"stride {spec.frame_stride}"
        raise SkipVideo("decode", f"too short: {len(chosen)} of {spec.num_frames} frames at {how} "
                                  f"from {spec.start_offset}s in {url}")
    meta = {"src_fps": round(src_fps, 4), "src_size": list(size), "rotation": rotation,
            "frame_times": times}
    return Clip(frames=np.stack(chosen), meta=meta)


def _decode_bucketed_open(container: av.container.InputContainer, url: str, spec: SamplingSpec,
                          buckets: Sequence[BucketShape], max_crop: float) -> Clip:
    """Decode then assign: select up to the longest bucket's frames, keeping the decoded
    frames (not yet converted), pick the bucket from what they show, convert its frames."""
    stream, src_fps = _open_stream(container, url, spec)
    longest = max(b.frames for b in buckets)
    picked = list(_select(container.decode(stream), replace(spec, num_frames=longest), src_fps))
    if not picked:
        how = sampling_words(spec.fps, spec.frame_stride, spec.start_offset)
        raise SkipVideo("decode", f"no frames {how} in {url}")
    first = picked[0][0]
    rotation = int(first.rotation or 0)
    width, height = first.width, first.height
    if round(rotation / 90) % 2:  # displayed upright: a quarter turn swaps the sides
        width, height = height, width
    how = sampling_words(spec.fps, spec.frame_stride, spec.start_offset)
    chosen = assign_bucket(width, height, len(picked), buckets, max_crop=max_crop, sampling=how)
    if chosen.bucket is None:
        raise SkipVideo("bucket", f"{chosen.reason}: {url}")
    b = chosen.bucket
    out = replace(spec, num_frames=b.frames, resolution=(b.height, b.width))
    frames = np.stack([_to_array(frame, out) for frame, _ in picked[:b.frames]])
    rw, rh = resized_size(width, height, (b.height, b.width))
    meta = {"src_fps": round(src_fps, 4), "src_size": [first.width, first.height], "rotation": rotation,
            "frame_times": [round(t, 4) for _, t in picked[:b.frames]], "bucket": b.name,
            "num_frames": b.frames, "resolution": [b.height, b.width],
            "resized_size": [rh, rw], "crop": round(chosen.crop, 4)}
    return Clip(frames=frames, meta=meta)


def decode_bucketed(url: str, spec: SamplingSpec, buckets: Sequence[BucketShape], *, max_crop: float,
                    fallbacks: Sequence[str] = (), fetch: Fetch | None = None) -> Clip:
    """Decode the video at `url` into the bucket it belongs to (`data_tools.buckets`).

    Decode, then assign: the frames at `spec`'s sampling (its num_frames and resolution are
    ignored) are selected up to the longest bucket's count, in one pass, and kept as decoded
    frames; their displayed size (rotation applied) and how many there are choose the
    bucket, and only its frames are resized (cover) and centre-cropped to its size. Container
    metadata (duration, frame count) is not trusted: it is missing or wrong often enough in
    web video, and the frames must be decoded anyway. At most the longest bucket's frame count
    of source-size frames is held at once.

    Returns a Clip whose meta adds `bucket` (its name), `num_frames`, `resolution` [H, W],
    `resized_size` [h, w] (the displayed frame after the cover resize, before the crop) and
    `crop` (the fraction of the picture cut). A clip that fits no bucket raises SkipVideo
    with stage "bucket" and the reason; other failures are as in `decode_clip`.
    """
    if not buckets:
        raise ValueError("decode_bucketed needs at least one bucket")
    url, source = _open_source([url, *fallbacks], fetch)
    url = redact_url(url)
    try:
        with av.open(source, mode="r") as container:
            clip = _decode_bucketed_open(container, url, spec, buckets, max_crop)
            clip.meta["source_url"] = url
            return clip
    except SkipVideo:
        raise
    except (av.FFmpegError, OSError, ValueError, EOFError, IndexError, ZeroDivisionError) as e:
        raise SkipVideo("decode", f"not a decodable video ({type(e).__name__}: {e}): {url}") from e


def decode_clip(url: str, spec: SamplingSpec, *, fallbacks: Sequence[str] = (),
                fetch: Fetch | None = None) -> Clip:
    """Decode `spec.num_frames` frames of the video at `url` (path or fsspec URL), or at the
    first of `fallbacks` that exists when `url` does not. `fetch` downloads http(s) URLs
    (raising `data_tools.fetch.FetchError`); None: a `Fetcher` with the default policy.

    Returns a Clip with frames uint8 [F, R, R, 3] and the (redacted) URL it read in
    `meta["source_url"]`. Raises `SkipVideo` for anything that makes the file unusable
    (missing, empty, not downloadable, not a video, corrupt, too short).
    """
    url, source = _open_source([url, *fallbacks], fetch)
    url = redact_url(url)
    try:
        with av.open(source, mode="r") as container:
            clip = _decode_open(container, url, spec)
            clip.meta["source_url"] = url
            return clip
    except SkipVideo:
        raise
    except (av.FFmpegError, OSError, ValueError, EOFError, IndexError, ZeroDivisionError) as e:
        # FFmpeg's own words ("moov atom not found", "Invalid data found ...") say enough
        raise SkipVideo("decode", f"not a decodable video ({type(e).__name__}: {e}): {url}") from e
