"""Latent codecs: frames <-> latents behind one small interface.

Two implementations:
- `VAECodec`: diffusers `AutoencoderKL` loaded from a diffusers-format directory (a
  ModelScope-T2V or SD checkpoint's `vae/`, local or any fsspec URL). The scaling factor
  comes from the VAE's own config, never from a literal.
- `LosslessCodec`: parameter-free pixel-unshuffle (space-to-depth). Exactly invertible,
  instant on a CPU, and it keeps motion visible at low resolution, which is what CPU demos
  and tests need to show that a model learned something. It is a config-only diffusers
  model, so an exported pipeline holds it in its `vae/` folder like a real VAE.

Frames are float tensors [N, 3, H, W] in [0, 1]; latents are [N, C, h, w], already
multiplied by the scaling factor (the shard contract).
"""

from __future__ import annotations

import os
from typing import Protocol

import torch
import torch.nn.functional as F
from diffusers import ModelMixin  # noqa: F401 -- named here: diffusers' loader looks it up in this module
from diffusers.configuration_utils import register_to_config

from trip.config import CodecConfig
from trip.model.config_only import ConfigOnlyModel


class LatentCodec(Protocol):
    channels: int
    downscale: int
    scaling_factor: float

    def encode(self, frames: torch.Tensor) -> torch.Tensor: ...
    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...
    def identity(self) -> dict: ...


def _check_frames(frames: torch.Tensor, downscale: int) -> None:
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"frames must be [N, 3, H, W], got {tuple(frames.shape)}")
    if frames.shape[-1] % downscale or frames.shape[-2] % downscale:
        raise ValueError(
            f"frame size {tuple(frames.shape[-2:])} must be divisible by the codec's downscale {downscale}"
        )


class LosslessCodec(ConfigOnlyModel):
    """Pixel-unshuffle by `downscale`: [N,3,H,W] in [0,1] -> [N, 3r^2, H/r, W/r] in [-1,1]."""

    scaling_factor = 1.0

    @register_to_config
    def __init__(self, downscale: int = 2) -> None:
        super().__init__()
        if downscale < 1:
            raise ValueError(f"downscale must be >= 1, got {downscale}")
        self.downscale = downscale
        self.channels = 3 * downscale * downscale

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        _check_frames(frames, self.downscale)
        return F.pixel_unshuffle(frames.float() * 2.0 - 1.0, self.downscale)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.ndim != 4 or latents.shape[1] != self.channels:
            raise ValueError(f"latents must be [N, {self.channels}, h, w], got {tuple(latents.shape)}")
        return ((F.pixel_shuffle(latents.float(), self.downscale) + 1.0) / 2.0).clamp(0.0, 1.0)

    def identity(self) -> dict:
        return {"kind": "lossless", "downscale": self.downscale, "scaling_factor": self.scaling_factor}


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class VAECodec:
    """diffusers `AutoencoderKL`; latents are the posterior mean times the scaling factor."""

    def __init__(self, path: str, device: str | torch.device = "cpu", dtype: str = "float32") -> None:
        from diffusers import AutoencoderKL

        local = vae_dir(path)
        vae = AutoencoderKL.from_pretrained(local, torch_dtype=_DTYPES[dtype]).to(torch.device(device))
        self._adopt(vae, path)

    @classmethod
    def of(cls, vae: torch.nn.Module, source: str = "<in memory>") -> VAECodec:
        """The codec of an already loaded `AutoencoderKL` (a pipeline's `vae`); shares it."""
        codec = cls.__new__(cls)
        codec._adopt(vae, source)
        return codec

    def _adopt(self, vae: torch.nn.Module, source: str) -> None:
        self.source = source
        self.vae = vae.eval()
        self.vae.requires_grad_(False)
        self.device, self.dtype = vae.device, vae.dtype
        cfg = self.vae.config
        self.scaling_factor = float(cfg.scaling_factor)
        self.channels = int(cfg.latent_channels)
        self.downscale = 2 ** (len(cfg.block_out_channels) - 1)

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        _check_frames(frames, self.downscale)
        x = (frames.to(self.vae.device, self.vae.dtype) * 2.0 - 1.0)
        posterior = self.vae.encode(x).latent_dist
        return (posterior.mean * self.scaling_factor).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.ndim != 4 or latents.shape[1] != self.channels:
            raise ValueError(f"latents must be [N, {self.channels}, h, w], got {tuple(latents.shape)}")
        x = self.vae.decode(latents.to(self.vae.device, self.vae.dtype) / self.scaling_factor).sample
        return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)

    def identity(self) -> dict:
        return {"kind": "vae", "source": self.source, "scaling_factor": self.scaling_factor,
                "latent_channels": self.channels, "downscale": self.downscale}


def vae_dir(path: str) -> str:
    """Local directory of the AutoencoderKL under `path/vae/` or `path/` (any fsspec URL)."""
    from trip.storage import local_copy

    local = local_copy(path)
    sub = os.path.join(local, "vae")
    if os.path.isfile(os.path.join(sub, "config.json")):
        local = sub
    if not os.path.isfile(os.path.join(local, "config.json")):
        raise FileNotFoundError(f"no AutoencoderKL config.json in {path} (nor in {path}/vae)")
    return local


def build_codec(cfg: CodecConfig, device: str | torch.device = "cpu") -> LatentCodec:
    if cfg.kind == "lossless":
        return LosslessCodec(cfg.downscale)
    assert cfg.path is not None
    return VAECodec(cfg.path, device=device, dtype=cfg.dtype)
