"""The residual path: a ModelScope-T2V-style 3D-UNet that predicts per-frame residual noise.

Its parameters are diffusers' `UNet3DConditionModel` sub-modules adopted one for one
(`conv_in`, `time_embedding`, `transformer_in`, `down_blocks`, `mid_block`, `up_blocks`,
`conv_norm_out`, `conv_out`), so the state dict is key-for-key the diffusers one and a
ModelScope-T2V `unet/` directory loads with strict=True. What this class adds is its own
forward pass:
- the image latent enters by temporal concatenation (the paper: frame slot 0, F+1 frames
  in, slot 0 dropped on the way out) or by channel concatenation (TRIP_C ablation);
- block-level activation checkpointing (diffusers' UNet3D has none; at paper scale the
  activations of 17 frames at 32x32 do not fit otherwise);
- every attention layer runs PyTorch SDPA (`AttnProcessor2_0`).

Note on `attention_head_dim`: diffusers' UNet3D uses it as the number of heads of each
block (a historic naming quirk that its serialised configs keep), while `transformer_in`
uses it as the per-head width. We keep the diffusers meaning so configs map one to one.
"""

from __future__ import annotations

import json
import os
from typing import Any, Literal

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from trip.config import UNetConfig

# diffusers config.json keys we understand; anything else must hold its default.
_DIFFUSERS_DEFAULTS = {
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "time_cond_proj_dim": None,
    "num_attention_heads": None,
}


def diffusers_unet_kwargs(cfg: UNetConfig, in_channels: int, out_channels: int) -> dict[str, Any]:
    """UNetConfig -> `UNet3DConditionModel(**kwargs)`."""
    return {
        "in_channels": in_channels,
        "out_channels": out_channels,
        "down_block_types": tuple(cfg.down_block_types),
        "up_block_types": tuple(cfg.up_block_types),
        "block_out_channels": tuple(cfg.block_out_channels),
        "layers_per_block": cfg.layers_per_block,
        "norm_num_groups": cfg.norm_num_groups,
        "norm_eps": cfg.norm_eps,
        "cross_attention_dim": cfg.cross_attention_dim,
        "attention_head_dim": cfg.attention_head_dim,
    }


def unet_config_from_diffusers(config: dict[str, Any], source: str) -> tuple[UNetConfig, int, int]:
    """A diffusers `unet/config.json` -> (UNetConfig, in_channels, out_channels)."""
    for key, default in _DIFFUSERS_DEFAULTS.items():
        if config.get(key, default) != default:
            raise ValueError(f"{source}: unsupported {key}={config[key]!r} (expected {default!r})")
    try:
        cfg = UNetConfig(
            block_out_channels=tuple(config["block_out_channels"]),
            down_block_types=tuple(config["down_block_types"]),
            up_block_types=tuple(config["up_block_types"]),
            layers_per_block=int(config["layers_per_block"]),
            norm_num_groups=int(config["norm_num_groups"]),
            cross_attention_dim=int(config["cross_attention_dim"]),
            attention_head_dim=int(config["attention_head_dim"]),
            norm_eps=float(config.get("norm_eps", 1e-5)),
        )
    except KeyError as e:
        raise ValueError(f"{source}: missing key {e.args[0]!r}") from e
    return cfg, int(config["in_channels"]), int(config["out_channels"])


class ResidualUNet3D(nn.Module):
    """3D-UNet over [B, C, F, H, W] latents with the image latent as extra input."""

    def __init__(self, cfg: UNetConfig, latent_channels: int,
                 image_conditioning: Literal["temporal", "channel"] = "temporal",
                 reference: nn.Module | None = None) -> None:
        """`reference`: a diffusers `UNet3DConditionModel` to adopt (its modules are shared, not
        copied: e.g. a pipeline's `unet`); by default a freshly initialised one."""
        super().__init__()
        from diffusers import UNet3DConditionModel
        from diffusers.models.attention_processor import Attention, AttnProcessor2_0

        self.cfg = cfg
        self.latent_channels = latent_channels
        self.image_conditioning = image_conditioning
        in_channels = latent_channels * (2 if image_conditioning == "channel" else 1)
        self.in_channels = in_channels
        kwargs = diffusers_unet_kwargs(cfg, in_channels, latent_channels)
        if reference is None:
            reference = UNet3DConditionModel(**kwargs)
        else:
            theirs = {k: reference.config[k] for k in kwargs}
            theirs = {k: tuple(v) if isinstance(v, list) else v for k, v in theirs.items()}
            if theirs != kwargs:
                raise ValueError(f"the UNet to adopt does not match model.unet: theirs {theirs}, ours {kwargs}")
        # Adopt the sub-modules: same names -> same state-dict keys as diffusers.
        self.conv_in = reference.conv_in
        self.time_proj = reference.time_proj
        self.time_embedding = reference.time_embedding
        self.transformer_in = reference.transformer_in
        self.down_blocks = reference.down_blocks
        self.mid_block = reference.mid_block
        self.up_blocks = reference.up_blocks
        self.conv_norm_out = reference.conv_norm_out
        self.conv_act = reference.conv_act
        self.conv_out = reference.conv_out
        self.num_upsamplers = reference.num_upsamplers
        for m in self.modules():
            if isinstance(m, Attention):
                m.set_processor(AttnProcessor2_0())
        self.gradient_checkpointing = False

    # ------------------------------------------------------------------ forward

    def _run(self, block: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False, **kwargs)
        return block(*args, **kwargs)

    def forward(self, noisy_latents: torch.Tensor, image_latents: torch.Tensor,
                timesteps: torch.Tensor, text_states: torch.Tensor) -> torch.Tensor:
        """Residual noise per frame.

        Args:
            noisy_latents: [B, C, F, H, W].
            image_latents: [B, C, H, W] clean latent of the conditioning image.
            timesteps: [B] integer diffusion steps.
            text_states: [B, L, D] text-encoder hidden states (zeros for "no text").

        Returns:
            [B, C, F, H, W].
        """
        b, c, f, h, w = noisy_latents.shape
        if self.image_conditioning == "temporal":
            x = torch.cat([image_latents.unsqueeze(2), noisy_latents], dim=2)  # slot 0 = image
        else:
            x = torch.cat([noisy_latents, image_latents.unsqueeze(2).expand(-1, -1, f, -1, -1)], dim=1)
        out = self._unet(x.to(self.conv_in.weight.dtype), timesteps, text_states)
        if self.image_conditioning == "temporal":
            out = out[:, :, 1:]  # drop the image slot: its "noise" is not part of the video
        return out

    def _unet(self, sample: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        b, _, frames = sample.shape[:3]
        dtype = self.conv_in.weight.dtype
        emb = self.time_embedding(self.time_proj(timesteps.expand(b)).to(dtype))
        emb = emb.repeat_interleave(frames, dim=0)
        text = text.to(dtype).repeat_interleave(frames, dim=0)
        x = sample.permute(0, 2, 1, 3, 4).reshape(b * frames, -1, *sample.shape[3:])
        x = self.conv_in(x)
        x = self._run(self.transformer_in, x, num_frames=frames, return_dict=False)[0]

        skips: tuple[torch.Tensor, ...] = (x,)
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                x, res = self._run(block, x, emb, encoder_hidden_states=text, num_frames=frames)
            else:
                x, res = self._run(block, x, emb, num_frames=frames)
            skips += res
        x = self._run(self.mid_block, x, emb, encoder_hidden_states=text, num_frames=frames)
        for block in self.up_blocks:
            res, skips = skips[-len(block.resnets):], skips[: -len(block.resnets)]
            if getattr(block, "has_cross_attention", False):
                x = self._run(block, x, res, emb, encoder_hidden_states=text, num_frames=frames)
            else:
                x = self._run(block, x, res, emb, num_frames=frames)
        if self.conv_norm_out is not None:
            x = self.conv_act(self.conv_norm_out(x))
        x = self.conv_out(x)
        return x.reshape(b, frames, *x.shape[1:]).permute(0, 2, 1, 3, 4)

    # ------------------------------------------------------------------ diffusers interop

    def diffusers_config(self) -> dict[str, Any]:
        return {"_class_name": "UNet3DConditionModel",
                **diffusers_unet_kwargs(self.cfg, self.in_channels, self.latent_channels)}

    def load_diffusers_state_dict(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Load a diffusers UNet3DConditionModel state dict; every key must match.

        With channel conditioning and a 4-channel pretrained `conv_in`, the extra image
        channels are added with zero weights so the pretrained behaviour is kept at start.
        """
        own = self.state_dict()
        w = state.get("conv_in.weight")
        if w is not None and w.shape[1] * 2 == own["conv_in.weight"].shape[1] \
                and self.image_conditioning == "channel":
            state = dict(state)
            state["conv_in.weight"] = torch.cat([w, torch.zeros_like(w)], dim=1)
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(
                f"{source}: weights do not match the residual UNet: "
                f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
            )
        for k, v in state.items():
            if tuple(v.shape) != tuple(own[k].shape):
                raise ValueError(f"{source}: shape of {k} is {tuple(v.shape)}, expected {tuple(own[k].shape)}")
        self.load_state_dict(state, strict=True)


def read_diffusers_unet(path: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, state dict) of a diffusers-format `unet/` dir, local or any fsspec URL.

    Only safetensors, or a `.bin` read with `weights_only=True` (no arbitrary pickle).
    """
    from safetensors.torch import load_file

    from trip.storage import local_copy

    try:
        local = local_copy(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"pretrained UNet not found: {path}") from e
    if os.path.isfile(os.path.join(local, "unet", "config.json")):
        local = os.path.join(local, "unet")
    cfg_path = os.path.join(local, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"pretrained UNet {path}: no config.json (nor unet/config.json)")
    with open(cfg_path) as fh:
        config = json.load(fh)
    st = os.path.join(local, "diffusion_pytorch_model.safetensors")
    bin_ = os.path.join(local, "diffusion_pytorch_model.bin")
    if os.path.isfile(st):
        state = load_file(st)
    elif os.path.isfile(bin_):
        state = torch.load(bin_, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"pretrained UNet {path}: no diffusion_pytorch_model.safetensors/.bin")
    return config, state
