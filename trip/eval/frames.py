"""Clip files -> frame arrays, and the resize/crop every feature network needs.

Evaluation reads whatever `trip sample` (or a reference set) wrote: MP4 or GIF files in a
local directory or under any fsspec URL. PyAV decodes both; a GIF's palette frames are
converted to RGB. Frames are kept as uint8 [T, H, W, 3] until a network needs them so a
whole evaluation set stays small in memory.
"""

from __future__ import annotations

import io
import os

import av
import numpy as np
import torch
import torch.nn.functional as F

from trip import storage

CLIP_EXTENSIONS = (".mp4", ".gif", ".webm", ".mov", ".avi", ".mkv")


def list_clips(root: str) -> list[str]:
    """Sorted paths/URLs of the video files directly under `root` (by extension)."""
    fs, path = storage.filesystem(root)
    if not fs.isdir(path):
        raise FileNotFoundError(f"clip directory does not exist: {root}")
    names = sorted(os.path.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))
    clips = [storage.join(root, n) for n in names if n.lower().endswith(CLIP_EXTENSIONS)]
    if not clips:
        raise ValueError(f"no video files ({', '.join(CLIP_EXTENSIONS)}) in {root}")
    return clips


def read_clip(path: str, max_frames: int | None = None) -> np.ndarray:
    """Decode a video file to uint8 RGB frames [T, H, W, 3] (at most `max_frames`)."""
    data = storage.read_bytes(path)
    frames: list[np.ndarray] = []
    try:
        with av.open(io.BytesIO(data)) as container:
            for frame in container.decode(video=0):
                frames.append(frame.to_ndarray(format="rgb24"))
                if max_frames is not None and len(frames) >= max_frames:
                    break
    except (av.error.FFmpegError, IndexError, ValueError) as e:
        raise ValueError(f"cannot decode video {path}: {e}") from e
    if not frames:
        raise ValueError(f"video {path} has no frames")
    return np.stack(frames)


def to_float(frames: np.ndarray) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float32 [T, 3, H, W] in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255.0


def resize_center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the shorter side to `size` (bicubic, antialiased), then center-crop a square.

    images: float [N, 3, H, W] in [0, 1]; returns float [N, 3, size, size] in [0, 1].
    """
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    if (new_h, new_w) != (h, w):
        images = F.interpolate(images, size=(new_h, new_w), mode="bicubic", align_corners=False,
                               antialias=True).clamp_(0.0, 1.0)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return images[..., top:top + size, left:left + size]
