"""LoRA adapters (peft) on a TRIPModel: which layers, what their tensors are called, how they merge.

Training (`train.lora`) injects peft LoRA layers into the residual UNet's attention
projections (`to_q`, `to_k`, `to_v`, `to_out.0` of every spatial, temporal and
`transformer_in` attention by default) and, with `train.lora.fusion`, into the TNF's (`q`,
`kv`, `out`); everything else is frozen. A wrapped layer `M` then holds `M.base_layer.weight`
(the frozen weight, `M.weight` in the plain model), `M.lora_A.default.weight` [r, in] and
`M.lora_B.default.weight` [out, r]; its output is `base(x) + (alpha / r) * B(A(dropout(x)))`.

Three spellings of an adapter tensor, converted here and nowhere else:
- in the training model and its checkpoints: `unet.M.lora_A.default.weight` (peft's, with the
  adapter name);
- in the exported file (diffusers' LoRA format, `pytorch_lora_weights.safetensors`):
  `unet.M.lora_A.weight`, the component name first, with the peft `LoraConfig` of each
  component as JSON in the file's metadata (`lora_adapter_metadata`, keys `unet.r`, ...);
- merged: `unet.M.weight + (alpha / r) * B @ A`, a plain model again.
Single-device code, like the rest of trip.model.
"""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.nn as nn

from trip.config import LoraConfig

ADAPTER = "default"  # peft's adapter name inside the training model
FUSION_TARGETS = ("q", "kv", "out")  # the TNF's attention projections (trip.model.fusion.Attention)
METADATA_KEY = "lora_adapter_metadata"  # diffusers' key in the safetensors metadata
COMPONENTS = ("unet", "fusion")


def peft_configs(lora: LoraConfig) -> dict[str, dict[str, Any]]:
    """The peft `LoraConfig` arguments of each adapted component."""
    base = {"r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "init_lora_weights": True}
    out = {"unet": {**base, "target_modules": list(lora.target_modules)}}
    if lora.fusion:
        out["fusion"] = {**base, "target_modules": list(FUSION_TARGETS)}
    return out


def add_adapters(model: nn.Module, lora: LoraConfig) -> None:
    """Inject the adapters into `model.unet` (and `model.fusion`) and freeze everything else.

    Adapter initialisation draws from torch's generator (A: Kaiming; B: zeros, so the adapted
    model starts as the base): seed it the same on every rank."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    model.requires_grad_(False)
    for comp, kwargs in peft_configs(lora).items():
        try:
            inject_adapter_in_model(PeftLoraConfig(**kwargs), getattr(model, comp), adapter_name=ADAPTER)
        except ValueError as e:  # peft: no module matched the targets
            raise ValueError(f"train.lora: cannot adapt the {comp} with target_modules "
                             f"{kwargs['target_modules']}: {e}") from e
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter(name))


def is_adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def base_key(name: str) -> str:
    """A peft-wrapped base weight's name in the plain model (`M.base_layer.weight` -> `M.weight`)."""
    return name.replace(".base_layer.", ".")


def to_file_key(name: str) -> str:
    """Training name -> exported name: `unet.M.lora_A.default.weight` -> `unet.M.lora_A.weight`."""
    return name.replace(f".lora_A.{ADAPTER}.", ".lora_A.").replace(f".lora_B.{ADAPTER}.", ".lora_B.")


def adapter_names(model: nn.Module, lora: LoraConfig) -> dict[str, tuple[int, ...]]:
    """Training names and shapes of the adapter tensors of `model` (a plain TRIPModel, e.g. on
    the meta device) once `lora` is added; the model itself is not changed."""
    import copy

    probe = copy.deepcopy(model)
    add_adapters(probe, lora)
    return {n: tuple(p.shape) for n, p in probe.named_parameters() if is_adapter(n)}


def save_adapters(path: str, adapters: dict[str, torch.Tensor], lora: LoraConfig) -> None:
    """Write exported-name adapters as diffusers' LoRA file (safetensors + per-component config)."""
    from safetensors.torch import save_file

    meta = {f"{comp}.{k}": v for comp, cfg in peft_configs(lora).items() for k, v in cfg.items()
            if any(n.startswith(f"{comp}.") for n in adapters)}
    save_file({k: v.contiguous() for k, v in adapters.items()}, path,
              metadata={"format": "pt", METADATA_KEY: json.dumps(meta, sort_keys=True)})


def merge(state: dict[str, torch.Tensor], adapters: dict[str, torch.Tensor], lora: LoraConfig
          ) -> dict[str, torch.Tensor]:
    """Plain-model weights + exported-name adapters -> plain-model weights with W += (alpha/r) B @ A."""
    out = dict(state)
    scale = lora.alpha / lora.rank
    for key, a in adapters.items():
        if ".lora_A." not in key:
            continue
        module = key.split(".lora_A.")[0]
        b = adapters.get(f"{module}.lora_B.weight")
        w = out.get(f"{module}.weight")
        if b is None or w is None:
            raise ValueError(f"adapter {key}: no {'lora_B' if b is None else 'base weight'} for {module}")
        delta = (b.float() @ a.float()) * scale
        if delta.shape != w.shape:
            raise ValueError(f"adapter {module}: B @ A is {tuple(delta.shape)}, the weight {tuple(w.shape)}")
        out[f"{module}.weight"] = (w.float() + delta).to(w.dtype)
    return out
