"""TRIPModel: residual 3D-UNet + image noise prior + temporal noise fusion.

Single-device code: no Ray, no DeepSpeed. The model owns the noise schedule it was trained
with (`alphas_cumprod`, a non-persistent buffer rebuilt from the diffusion config) because
the shortcut path needs it at every call; everything else about diffusion (sampling
timesteps and noise, the scheduler's update rule) lives outside, in `trip.diffusion` and
`trip.sampling`.

A saved model directory holds `config.json` (model + diffusion sections) and
`model.safetensors`, written with `save_pretrained` and read by `from_pretrained`, from a
local path or any fsspec URL. `from_pretrained` also reads the diffusers layout that `trip
export` writes by default (`trip.model.diffusers_layout`).
"""

from __future__ import annotations

import json
import os
from typing import NamedTuple

import torch
import torch.nn as nn

from trip.config import (
    ConfigError,
    DiffusionConfig,
    ModelConfig,
    config_from_dict,
    latent_size_problem,
    to_dict,
)
from trip.model.fusion import build_fusion
from trip.model.noise_prior import image_noise_prior
from trip.model.unet import ResidualUNet3D, read_diffusers_unet, unet_config_from_diffusers

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def alphas_cumprod_for(cfg: DiffusionConfig) -> torch.Tensor:
    """abar_t of the configured schedule, from the diffusers scheduler itself."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                          beta_start=cfg.beta_start, beta_end=cfg.beta_end)
    return sched.alphas_cumprod.clone().float()


class TRIPOutput(NamedTuple):
    """What one forward pass predicts, each [B, C, F, H, W]. A named tuple, not a dataclass:
    DeepSpeed ZeRO-3 finds a module's output tensors (to hook its backward) only in tensors,
    tuples, lists and dicts."""

    noise: torch.Tensor  # fused prediction eps_hat
    residual: torch.Tensor  # UNet output delta
    reference: torch.Tensor  # image noise prior eps_ref


def set_temporal_conv_dropout(module: nn.Module, p: float) -> None:
    """diffusers builds every TemporalConvLayer with dropout 0.1 and no knob: set it here."""
    from diffusers.models.resnet import TemporalConvLayer

    for m in module.modules():
        if isinstance(m, TemporalConvLayer):
            for d in m.modules():
                if isinstance(d, nn.Dropout):
                    d.p = p


class TRIPModel(nn.Module):
    def __init__(self, cfg: ModelConfig, diffusion: DiffusionConfig | None = None, *,
                 unet: ResidualUNet3D | None = None, fusion: nn.Module | None = None) -> None:
        """A freshly initialised model, or one assembled from given parts (shared, not copied:
        `TRIPPipeline` assembles its components this way)."""
        super().__init__()
        self.cfg = cfg
        self.diffusion_cfg = diffusion or DiffusionConfig()
        if unet is None:
            unet = ResidualUNet3D(cfg.unet, cfg.latent_channels, cfg.image_conditioning)
            set_temporal_conv_dropout(unet, cfg.temporal_conv_dropout)
        self.unet = unet
        self.fusion = fusion if fusion is not None else build_fusion(
            cfg.fusion, cfg.latent_channels, cfg.num_frames, cfg.latent_size)
        self.register_buffer("alphas_cumprod", alphas_cumprod_for(self.diffusion_cfg), persistent=False)
        self.set_gradient_checkpointing(cfg.gradient_checkpointing)
        if cfg.pretrained_unet:
            self.load_pretrained_unet(cfg.pretrained_unet)
        if cfg.pretrained_model:
            self.load_pretrained_model(cfg.pretrained_model)

    # ------------------------------------------------------------------ construction

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        self.unet.gradient_checkpointing = enabled

    def load_pretrained_unet(self, path: str) -> None:
        """Initialise the residual UNet from a diffusers-format `unet/` (ModelScope T2V)."""
        config, state = read_diffusers_unet(path)
        theirs, _, out_ch = unet_config_from_diffusers(config, path)
        if theirs != self.cfg.unet or out_ch != self.cfg.latent_channels:
            raise ValueError(
                f"pretrained UNet {path} does not match model.unet: theirs {to_dict(theirs)} "
                f"(out_channels={out_ch}), ours {to_dict(self.cfg.unet)} (latent_channels={self.cfg.latent_channels})"
            )
        self.unet.load_diffusers_state_dict(state, path)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """The two parameter groups of the paper: the 3D-UNet and the fusion module."""
        return {
            "unet": [p for p in self.unet.parameters() if p.requires_grad],
            "fusion": [p for p in self.fusion.parameters() if p.requires_grad],
        }

    # ------------------------------------------------------------------ forward

    def _check_inputs(self, noisy: torch.Tensor, image: torch.Tensor, t: torch.Tensor,
                      text: torch.Tensor | None) -> None:
        """Latents of the configured (h, w) or of any other size the model takes (both sides
        multiples of the UNet's downsampling and of the TNF patch: see `latent_size_problem`)."""
        c, (h, w) = self.cfg.latent_channels, self.cfg.latent_hw
        ok = noisy.ndim == 5 and noisy.shape[1] == c
        problem = latent_size_problem(self.cfg, tuple(noisy.shape[3:])) if ok else None
        if not ok or problem:
            raise ValueError(f"noisy_latents: expected [B, {c}, F, {h}, {w}], got {tuple(noisy.shape)}"
                             + (f" ({problem})" if problem else ""))
        b, (h, w) = noisy.shape[0], noisy.shape[3:]
        if tuple(image.shape) != (b, c, h, w):
            raise ValueError(f"image_latents: expected [{b}, {c}, {h}, {w}], got {tuple(image.shape)}")
        if t.ndim != 1 or t.shape[0] != b:
            raise ValueError(f"timesteps: expected [{b}], got {tuple(t.shape)}")
        if text is not None and (text.ndim != 3 or text.shape[0] != b
                                 or text.shape[2] != self.cfg.unet.cross_attention_dim):
            raise ValueError(
                f"text_states: expected [{b}, L, {self.cfg.unet.cross_attention_dim}], got {tuple(text.shape)}"
            )

    def null_text(self, batch: int, device: torch.device) -> torch.Tensor:
        """The "no caption" condition: one all-zero token."""
        return torch.zeros(batch, 1, self.cfg.unet.cross_attention_dim, device=device)

    def forward(self, noisy_latents: torch.Tensor, image_latents: torch.Tensor,
                timesteps: torch.Tensor, text_states: torch.Tensor | None = None) -> TRIPOutput:
        """Predict the noise of every frame.

        Args:
            noisy_latents: z_t, [B, C, F, H, W]; (H, W) is model.latent_size or any other size
                whose sides divide by the UNet's downsampling and the TNF patch size.
            image_latents: z_0^1, clean latent of the given image, [B, C, H, W].
            timesteps: [B] integer diffusion steps.
            text_states: [B, L, D] text hidden states, or None for no caption.
        """
        self._check_inputs(noisy_latents, image_latents, timesteps, text_states)
        if text_states is None:
            text_states = self.null_text(noisy_latents.shape[0], noisy_latents.device)
        residual = self.unet(noisy_latents, image_latents, timesteps, text_states)
        reference = image_noise_prior(noisy_latents, image_latents, self.alphas_cumprod, timesteps)
        noise = self.fusion(residual, reference, timesteps)
        return TRIPOutput(noise=noise, residual=residual, reference=reference)

    # ------------------------------------------------------------------ persistence

    def config_dict(self) -> dict:
        return {"model": to_dict(self.cfg), "diffusion": to_dict(self.diffusion_cfg), "format": "trip/1"}

    def save_pretrained(self, path: str, state_dict: dict[str, torch.Tensor] | None = None,
                        extra: dict | None = None) -> None:
        """Write config.json + model.safetensors to a local dir or fsspec URL.

        `state_dict` replaces the live weights (e.g. EMA weights on export); `extra` adds
        config sections that travel with the model (the codec and sample settings).
        """
        from safetensors.torch import save_file

        from trip.storage import local_dir_for_upload

        state = state_dict if state_dict is not None else self.state_dict()
        state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        with local_dir_for_upload(path) as local:
            tmp = os.path.join(local, f".{WEIGHTS_NAME}.tmp")
            save_file(state, tmp)
            os.replace(tmp, os.path.join(local, WEIGHTS_NAME))
            self.write_config(local, extra)

    def write_config(self, local_dir: str, extra: dict | None = None) -> None:
        """config.json of `save_pretrained`, for writers that produce model.safetensors themselves."""
        cfg = {**(extra or {}), **self.config_dict()}
        cfg["model"] = dict(cfg["model"], pretrained_unet=None, pretrained_model=None)  # weights are in this dir now
        with open(os.path.join(local_dir, CONFIG_NAME), "w") as fh:
            json.dump(cfg, fh, indent=2)

    @classmethod
    def from_pretrained(cls, path: str, map_location: str | torch.device = "cpu") -> TRIPModel:
        """Load a directory written by `save_pretrained` or `trip export` in either format
        (local or fsspec URL)."""
        model_cfg, diff_cfg, state = read_exported(path, str(map_location))
        model = cls(model_cfg, diff_cfg)
        model.load_state_dict(state, strict=True)
        return model

    def load_pretrained_model(self, path: str) -> None:
        """Initialise the UNet and fusion from an exported TRIP model (either format), whose
        shape must be this model's."""
        theirs, _, state = read_exported(path)
        arch = ("num_frames", "latent_channels", "latent_size", "image_conditioning", "unet", "fusion")
        diff = [k for k in arch if getattr(theirs, k) != getattr(self.cfg, k)]
        if diff:
            raise ValueError(f"pretrained model {path} does not match the model section: "
                             + "; ".join(f"{k}: theirs {to_dict(getattr(theirs, k))}, ours {to_dict(getattr(self.cfg, k))}"
                                         for k in diff))
        self.load_state_dict(state, strict=True)


def read_exported(path: str, device: str = "cpu") -> tuple[ModelConfig, DiffusionConfig, dict[str, torch.Tensor]]:
    """(model config, diffusion config, state dict) of a `trip export` directory of either format."""
    from safetensors.torch import load_file

    from trip.model import diffusers_layout as layout
    from trip.storage import local_copy

    try:
        local = local_copy(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"TRIP model directory not found: {path}") from e
    if layout.is_diffusers_dir(local):
        model_cfg, diff_cfg = layout.read_configs(local)
        return model_cfg, diff_cfg, layout.read_state(local, device)
    cfg_path = os.path.join(local, CONFIG_NAME)
    weights = os.path.join(local, WEIGHTS_NAME)
    for needed in (cfg_path, weights):
        if not os.path.isfile(needed):
            raise FileNotFoundError(f"{path}: missing {os.path.basename(needed)} (is this a TRIP model dir?)")
    with open(cfg_path) as fh:
        raw = json.load(fh)
    if raw.get("format") != "trip/1":
        raise ConfigError(f"{cfg_path}: not a TRIP model config (format {raw.get('format')!r})")
    model_cfg = config_from_dict(raw["model"], cfg_path + ":model", ModelConfig)
    diff_cfg = config_from_dict(raw["diffusion"], cfg_path + ":diffusion", DiffusionConfig)
    return model_cfg, diff_cfg, load_file(weights, device=device)
