"""Writing and reading short clips: MP4 through PyAV, GIF and PNG through Pillow.

Frames are float tensors [F, 3, H, W] in [0, 1] everywhere in the library; conversion to
uint8 happens only here, at the file boundary. Files are written under a temporary name
and renamed, so a crash never leaves a half-written video that looks complete.
"""

from __future__ import annotations

import os
from fractions import Fraction

import av
import numpy as np
import torch
from PIL import Image


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """[F, 3, H, W] float in [0, 1] -> [F, H, W, 3] uint8."""
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"frames must be [F, 3, H, W], got {tuple(frames.shape)}")
    return (frames.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def _tmp_path(path: str) -> str:
    head, tail = os.path.split(os.path.abspath(path))
    os.makedirs(head, exist_ok=True)
    return os.path.join(head, f".{tail}.partial")


def write_mp4(frames: torch.Tensor, path: str, fps: int = 4) -> str:
    """Encode H.264 (yuv420p needs even sizes: frames are padded by edge replication)."""
    arr = to_uint8(frames)
    h, w = arr.shape[1:3]
    ph, pw = h % 2, w % 2
    if ph or pw:
        arr = np.pad(arr, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
    tmp = _tmp_path(path)
    with av.open(tmp, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height = arr.shape[2], arr.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "12", "preset": "veryfast"}
        for frame in arr:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(tmp, path)
    return path


def write_gif(frames: torch.Tensor, path: str, fps: int = 4, scale: int = 1) -> str:
    """Looping GIF; `scale` enlarges tiny clips with nearest-neighbour so they can be seen."""
    images = [Image.fromarray(f) for f in to_uint8(frames)]
    if scale > 1:
        images = [im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in images]
    tmp = _tmp_path(path)
    images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:],
                   duration=int(1000 / fps), loop=0)
    os.replace(tmp, path)
    return path


def write_png_strip(frames: torch.Tensor, path: str) -> str:
    """Every frame side by side in one PNG: lossless, unlike MP4 and GIF."""
    strip = np.concatenate(list(to_uint8(frames)), axis=1)
    tmp = _tmp_path(path)
    Image.fromarray(strip).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def read_frames(path: str, max_frames: int | None = None) -> torch.Tensor:
    """Decode every frame of a video or GIF (or one still image) -> [F, 3, H, W] in [0, 1]."""
    if path.lower().endswith((".png", ".jpg", ".jpeg", ".bmp", ".webp")):
        img = np.array(Image.open(path).convert("RGB"))  # a writable copy for torch
        return torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255.0
    frames = []
    with av.open(path) as container:
        for frame in container.decode(video=0):
            frames.append(frame.to_ndarray(format="rgb24"))
            if max_frames and len(frames) >= max_frames:
                break
    if not frames:
        raise ValueError(f"{path}: no video frames could be decoded")
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255.0
