"""Clips and captions -> latents and text states, batched, on whatever device is there.

The encode stage of preprocessing: the latent codec (lossless pixel-unshuffle, or a
diffusers `AutoencoderKL` from a diffusers-format directory) over the frames of many
clips at once, and optionally a CLIP text encoder (`text_encoder/` + `tokenizer/` of a
diffusers-format directory) over their captions. Everything loads from a local path or
an fsspec URL (copied to a local cache once): no model hub access at run time.

On a GPU the codec runs in the configured half precision; on a CPU it runs in float32
(half-precision convolutions are slow or missing there). Output is float16 as the shard
contract says.

`codec_identity` / `text_encoder_identity` / `latent_shape` describe the outputs from the
configuration files alone, so the job driver can write index.json (and size shards)
without loading any weights.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np
import torch

from trip import storage
from trip.codec import LatentCodec, LosslessCodec, build_codec
from trip.config import CodecConfig, show_size, size_hw

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _read_json(url: str) -> dict[str, Any] | None:
    try:
        return json.loads(storage.read_bytes(url))
    except FileNotFoundError:
        return None


def _vae_config(path: str) -> dict[str, Any]:
    """The AutoencoderKL config.json under `path/vae/` or `path/` (like VAECodec's lookup)."""
    for url in (storage.join(path, "vae", "config.json"), storage.join(path, "config.json")):
        cfg = _read_json(url)
        if cfg is not None:
            return cfg
    raise FileNotFoundError(f"no AutoencoderKL config.json in {path} (nor in {path}/vae)")


def codec_identity(cfg: CodecConfig) -> dict[str, Any]:
    """What `build_codec(cfg).identity()` returns, read from config files only."""
    if cfg.kind == "lossless":
        return LosslessCodec(cfg.downscale).identity()
    assert cfg.path is not None
    vae = _vae_config(cfg.path)
    # diffusers' AutoencoderKL defaults, for configs that leave these out
    return {"kind": "vae", "source": cfg.path,
            "scaling_factor": float(vae.get("scaling_factor", 0.18215)),
            "latent_channels": int(vae.get("latent_channels", 4)),
            "downscale": 2 ** (len(vae.get("block_out_channels", [64])) - 1)}


def latent_shape(cfg: CodecConfig, num_frames: int, resolution: int | tuple[int, int]) -> list[int]:
    """[F, C, h, w] of one clip's latents (frames of `resolution`: S x S, or H x W for a pair)."""
    ident = codec_identity(cfg)
    channels = ident["latent_channels"] if cfg.kind == "vae" else 3 * cfg.downscale**2
    down = ident["downscale"]
    height, width = size_hw(resolution)
    if height % down or width % down:
        raise ValueError(f"preprocess.resolution={show_size(resolution)} is not divisible by the codec's "
                         f"downscale {down}")
    return [num_frames, channels, height // down, width // down]


def text_encoder_identity(path: str | None, max_length: int) -> dict[str, Any] | None:
    """{source, max_length, hidden_size} of the CLIP text encoder under `path`, or None."""
    if not path:
        return None
    cfg = _read_json(storage.join(path, "text_encoder", "config.json"))
    if cfg is None:
        raise FileNotFoundError(f"no text_encoder/config.json in {path}")
    hidden = cfg.get("hidden_size") or cfg.get("text_config", {}).get("hidden_size")
    return {"source": path, "max_length": max_length, "hidden_size": int(hidden),
            "model_type": cfg.get("model_type", "clip_text_model")}


class TextEncoder:
    """CLIP text encoder: captions -> last hidden states [N, L, D] (padded to L tokens)."""

    def __init__(self, path: str, max_length: int, device: str, dtype: torch.dtype) -> None:
        from transformers import CLIPTextModel, CLIPTokenizer

        local = storage.local_copy(path)
        for sub in ("text_encoder", "tokenizer"):
            if not os.path.isdir(os.path.join(local, sub)):
                raise FileNotFoundError(f"{path} has no {sub}/ directory (diffusers layout expected)")
        self.tokenizer = CLIPTokenizer.from_pretrained(os.path.join(local, "tokenizer"))
        self.model = CLIPTextModel.from_pretrained(os.path.join(local, "text_encoder"), dtype=dtype)
        self.model = self.model.to(device).eval().requires_grad_(False)
        self.max_length = max_length
        self.device = device

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> np.ndarray:
        from trip.pipeline import encode_prompts  # the one encoding, shared with sampling

        states = encode_prompts(self.tokenizer, self.model, captions, self.max_length, self.device)
        return states.float().cpu().numpy().astype(np.float16)


class ClipEncoder:
    """Frames -> latents (and captions -> text states) in batches of `batch_size` frames."""

    def __init__(self, codec: CodecConfig, *, text_encoder: str | None = None,
                 max_text_length: int = 77, batch_size: int = 16, device: str | None = None) -> None:
        self.device = device or default_device()
        if self.device == "cpu" and codec.kind == "vae":
            codec = dataclasses.replace(codec, dtype="float32")
        self.codec: LatentCodec = build_codec(codec, device=self.device)
        self.batch_size = max(1, batch_size)
        dtype = _DTYPES[codec.dtype] if self.device != "cpu" else torch.float32
        self.text = (TextEncoder(text_encoder, max_text_length, self.device, dtype)
                     if text_encoder else None)

    def encode_frames(self, clips: np.ndarray) -> np.ndarray:
        """uint8 [N, F, H, W, 3] -> float16 latents [N, F, C, h, w] (scaled)."""
        n, f = clips.shape[:2]
        flat = torch.from_numpy(np.ascontiguousarray(clips.reshape(n * f, *clips.shape[2:])))
        outs = []
        for start in range(0, n * f, self.batch_size):
            chunk = flat[start:start + self.batch_size].permute(0, 3, 1, 2).float() / 255.0
            outs.append(self.codec.encode(chunk).to("cpu", torch.float16))
        lat = torch.cat(outs).numpy()
        return lat.reshape(n, f, *lat.shape[1:])

    def encode_text(self, captions: list[str]) -> np.ndarray | None:
        """captions -> float16 [N, L, D], or None without a text encoder."""
        return None if self.text is None else self.text(captions)
