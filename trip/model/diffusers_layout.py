"""How a TRIP model maps onto diffusers' folder layout: names, configs and keys in one place.

An exported model directory (`trip export --format diffusers`) is a diffusers pipeline:

    model_index.json        TRIPPipeline and the class of every component
    unet/                   UNet3DConditionModel: config.json + diffusion_pytorch_model.safetensors
    fusion/                 TemporalNoiseFusion | LinearFusion | NoFusion (trip.model.fusion)
    scheduler/              DDIMScheduler: scheduler_config.json (the training noise schedule)
    vae/                    AutoencoderKL, or LosslessCodec (config only)
    text_encoder/, tokenizer/   when the run used captions
    trip.json               the run config, checkpoint and step it came from
    README.md               the model card

A TRIPModel's state dict splits on its first key component: `unet.<k>` is `<k>` in
`unet/`, `fusion.<k>` is `<k>` in `fusion/`. The model's shape is read back from the two
configs: the UNet's (diffusers' own keys, `sample_size` = latent size: an int, or [h, w] for
non-square latents, which diffusers' UNet3DConditionModel accepts too; `in_channels` twice
`out_channels` for channel conditioning) and the fusion's (`latent_channels`, `num_frames`,
`latent_size` and its own fields). This module reads and names; `trip.train.export` writes
and `trip.pipeline` loads through diffusers.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from trip.config import DiffusionConfig, ModelConfig, normalise_size, show_size

MODEL_INDEX = "model_index.json"
RUN_RECORD = "trip.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"
CONFIG = "config.json"
SCHEDULER_CONFIG = "scheduler_config.json"
UNET, FUSION, SCHEDULER, VAE = "unet", "fusion", "scheduler", "vae"
TEXT_ENCODER, TOKENIZER = "text_encoder", "tokenizer"
WEIGHTED = (UNET, FUSION)  # the components holding a TRIPModel's weights


def split_key(name: str) -> tuple[str, str]:
    """TRIPModel state-dict key -> (component folder, key inside it)."""
    comp, _, rest = name.partition(".")
    if comp not in WEIGHTED or not rest:
        raise ValueError(f"{name!r} belongs to no component (keys start with one of {WEIGHTED})")
    return comp, rest


def is_diffusers_dir(local: str) -> bool:
    return os.path.isfile(os.path.join(local, MODEL_INDEX))


def unet_config(cfg: ModelConfig) -> dict[str, Any]:
    """`UNet3DConditionModel(**kwargs)` of a TRIP model's residual UNet."""
    from trip.model.unet import diffusers_unet_kwargs

    in_ch = cfg.latent_channels * (2 if cfg.image_conditioning == "channel" else 1)
    size = list(cfg.latent_size) if isinstance(cfg.latent_size, tuple) else cfg.latent_size  # [h, w] as JSON has it
    return {**diffusers_unet_kwargs(cfg.unet, in_ch, cfg.latent_channels), "sample_size": size}


def model_config(unet: dict[str, Any], fusion: dict[str, Any], source: str) -> ModelConfig:
    """The ModelConfig of saved `unet/` and `fusion/` configs (training-only fields at defaults)."""
    from trip.model.fusion import fusion_config_from_saved
    from trip.model.unet import unet_config_from_diffusers

    unet_cfg, in_ch, out_ch = unet_config_from_diffusers(unet, f"{source}/{UNET}/{CONFIG}")
    fusion_cfg, channels, frames, size = fusion_config_from_saved(fusion, f"{source}/{FUSION}/{CONFIG}")
    if channels != out_ch or in_ch not in (out_ch, 2 * out_ch):
        raise ValueError(f"{source}: the UNet maps {in_ch} -> {out_ch} channels, the fusion was built for "
                         f"{channels}: not one TRIP model")
    sample = unet.get("sample_size")
    if sample is not None and normalise_size(sample, f"{source}: unet sample_size") != size:
        raise ValueError(f"{source}: unet sample_size {sample} != fusion latent_size {show_size(size)}")
    return ModelConfig(num_frames=frames, latent_channels=channels, latent_size=size,
                       image_conditioning="channel" if in_ch == 2 * out_ch else "temporal",
                       unet=unet_cfg, fusion=fusion_cfg)


def diffusion_config(scheduler: dict[str, Any]) -> DiffusionConfig:
    """The training noise schedule of a saved scheduler config."""
    return DiffusionConfig(num_train_timesteps=int(scheduler["num_train_timesteps"]),
                           beta_schedule=scheduler["beta_schedule"], beta_start=float(scheduler["beta_start"]),
                           beta_end=float(scheduler["beta_end"]))


def _json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing (an exported TRIP model has {UNET}/, {FUSION}/ and "
                                f"{SCHEDULER}/ beside {MODEL_INDEX})")
    with open(path) as fh:
        return json.load(fh)


def read_configs(local: str) -> tuple[ModelConfig, DiffusionConfig]:
    """(model, diffusion) configs of a local diffusers-layout TRIP model directory."""
    unet = _json(os.path.join(local, UNET, CONFIG))
    fusion = _json(os.path.join(local, FUSION, CONFIG))
    scheduler = _json(os.path.join(local, SCHEDULER, SCHEDULER_CONFIG))
    return model_config(unet, fusion, local), diffusion_config(scheduler)


def read_state(local: str, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The TRIPModel state dict of a local diffusers-layout directory (keys prefixed back)."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for comp in WEIGHTED:
        path = os.path.join(local, comp, WEIGHTS)
        if os.path.isfile(path):  # a weightless fusion has none
            state.update({f"{comp}.{k}": v for k, v in load_file(path, device=device).items()})
        elif comp == UNET:
            raise FileNotFoundError(f"{path} is missing")
    return state
