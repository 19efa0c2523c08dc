"""Feature networks for FVD (I3D, per clip) and FID (Inception, per frame), loaded by path.

Two weight formats, both loaded without unpickling arbitrary objects:
- TorchScript archives (`torch.jit.load`), e.g. StyleGAN-V's `i3d_torchscript.pt` and
  StyleGAN2-ADA's `inception-2015-12-05.pt`, the files most FVD/FID numbers in the
  literature come from. Their `forward` takes keyword flags (`rescale`, `resize`,
  `return_features`); we read the TorchScript schema and pass the flags it declares, so
  a plain `forward(x)` module works too.
- State dicts (`torch.load(weights_only=True)`) for the architectures defined in
  `trip.eval.i3d` and `trip.eval.inception`.

Input conventions (what each network is fed):
- I3D: float [B, 3, T, 224, 224] in [-1, 1] (frames resized on the shorter side, center-cropped).
- Inception, StyleGAN-style TorchScript (declares `return_features`): float
  [B, 3, 299, 299] in [0, 255] (that network normalises internally).
- Inception, any other TorchScript or our state dict: float [B, 3, 299, 299] in [-1, 1].
Outputs are flattened to [B, D] features (a tuple output contributes its first element).
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from trip import storage
from trip.eval.frames import resize_center_crop, to_float
from trip.eval.i3d import i3d_from_state_dict
from trip.eval.inception import inception_from_state_dict

I3D_SIZE = 224
INCEPTION_SIZE = 299
# Flags of the StyleGAN-family TorchScript detectors: we do our own resizing and scaling.
_DETECTOR_FLAGS: dict[str, bool] = {"rescale": False, "resize": False, "return_features": True}


def is_torchscript(path: str) -> bool:
    """True when `path` is a TorchScript archive (a zip holding compiled `code/`)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any("/code/" in "/" + name for name in zf.namelist())


@dataclass
class FeatureNet:
    """A loaded feature network with the input convention it expects."""

    module: nn.Module
    kind: str                      # "i3d" or "inception"
    source: str                    # the path it came from (for the report)
    value_range: tuple[float, float] = (-1.0, 1.0)
    size: int = I3D_SIZE
    flags: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """batch in [0, 1] (shape per `kind`, see the module docstring) -> features [B, D]."""
        lo, hi = self.value_range
        with torch.inference_mode():
            out = self.module(batch.to(self.device) * (hi - lo) + lo, **self.flags)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.float().flatten(1).cpu()


def _load_weights(path: str, kind: str) -> tuple[nn.Module, dict[str, bool] | None]:
    """(module, StyleGAN flags or None for a plain module) from a TorchScript or state dict file."""
    local = storage.local_copy(path)
    if is_torchscript(local):
        module = torch.jit.load(local, map_location="cpu")
        declared = {a.name for a in module.forward.schema.arguments}
        flags = {k: v for k, v in _DETECTOR_FLAGS.items() if k in declared}
        return module, (flags or None)
    try:
        state = torch.load(local, map_location="cpu", weights_only=True)
    except Exception as e:  # any unreadable/unsafe file: say which and why
        raise ValueError(f"{kind} weights {path}: neither TorchScript nor a weights-only state dict ({e})") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{kind} weights {path}: expected a state dict, got {type(state).__name__}")
    build = i3d_from_state_dict if kind == "i3d" else inception_from_state_dict
    return build(state, source=f"{kind} weights {path}"), None


def load_feature_net(path: str, kind: str, device: str = "cpu") -> FeatureNet:
    """Load I3D (`kind="i3d"`) or Inception (`kind="inception"`) weights from `path`."""
    if kind not in ("i3d", "inception"):
        raise ValueError(f"unknown feature network kind {kind!r} (i3d or inception)")
    module, flags = _load_weights(path, kind)
    module = module.eval().to(device)
    size = I3D_SIZE if kind == "i3d" else INCEPTION_SIZE
    # StyleGAN's Inception detector expects raw [0, 255] pixels; everything else [-1, 1].
    stylegan_inception = kind == "inception" and flags is not None and "return_features" in flags
    value_range = (0.0, 255.0) if stylegan_inception else (-1.0, 1.0)
    return FeatureNet(module, kind, path, value_range, size, flags or {}, device)


def clip_features(net: FeatureNet, clips: Sequence[np.ndarray], batch_size: int = 8) -> np.ndarray:
    """I3D features of clips (each uint8 [T, H, W, 3], equal T) -> float64 [N, D]."""
    lengths = {c.shape[0] for c in clips}
    if len(lengths) != 1:
        raise ValueError(f"FVD needs clips of equal length, got frame counts {sorted(lengths)}")
    out: list[torch.Tensor] = []
    for i in range(0, len(clips), batch_size):
        # [B, T, 3, S, S] -> [B, 3, T, S, S]
        batch = torch.stack([resize_center_crop(to_float(c), net.size) for c in clips[i:i + batch_size]])
        out.append(net(batch.permute(0, 2, 1, 3, 4).contiguous()))
    return torch.cat(out).double().numpy()


def frame_features(net: FeatureNet, clips: Sequence[np.ndarray], batch_size: int = 32) -> np.ndarray:
    """Inception features of every frame of every clip (uint8 [T, H, W, 3]) -> float64 [sum T, D]."""
    out: list[torch.Tensor] = []
    for clip in clips:
        for i in range(0, clip.shape[0], batch_size):
            out.append(net(resize_center_crop(to_float(clip[i:i + batch_size]), net.size)))
    return torch.cat(out).double().numpy()
