"""F-Consistency (TRIP paper, Sec. 4): how faithfully a generated video keeps its first frame.

F-Consistency_k = 100 * mean_{i=2..k+1} cos(CLIP(frame_1), CLIP(frame_i)), with k = 4
("F-Consistency_4") and k = T - 1 ("F-Consistency_all"). The paper says "the first frame
and the next 4 / all frames"; we compare the first frame with the *other* frames (the
first against itself is always 1 and would only inflate the score). A dataset score is
the mean of the per-video scores. A static video scores exactly 100.

CLIP image features come from a local CLIP directory (a full `CLIPModel` or a
`CLIPVisionModelWithProjection`; only the vision tower and projection are loaded, never
from the hub). Preprocessing follows the directory's `preprocessor_config.json` (resize
the shorter side, center-crop, normalise) implemented in torch on whole frame batches;
without that file it falls back to the model's image size and OpenAI CLIP statistics.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch

from trip import storage
from trip.eval.frames import resize_center_crop, to_float

# OpenAI CLIP's normalisation, the default of CLIPImageProcessor.
_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ClipPreprocess:
    """Resize the shorter side to `resize`, center-crop `crop` x `crop`, normalise."""

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @staticmethod
    def from_dir(model_dir: str, image_size: int) -> ClipPreprocess:
        path = os.path.join(model_dir, "preprocessor_config.json")
        if not os.path.exists(path):
            return ClipPreprocess(image_size, image_size, _OPENAI_MEAN, _OPENAI_STD)
        with open(path) as f:
            cfg = json.load(f)
        size, crop = cfg.get("size", image_size), cfg.get("crop_size", image_size)
        resize = size.get("shortest_edge", image_size) if isinstance(size, dict) else int(size)
        crop_px = min(crop.get("height", image_size), crop.get("width", image_size)) if isinstance(crop, dict) else int(crop)
        if not cfg.get("do_center_crop", True):
            crop_px = resize
        return ClipPreprocess(int(resize), int(crop_px), tuple(cfg.get("image_mean", _OPENAI_MEAN)),
                              tuple(cfg.get("image_std", _OPENAI_STD)))

    def __call__(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 [T, H, W, 3] -> normalised float [T, 3, crop, crop]."""
        x = resize_center_crop(to_float(frames), self.resize)
        if self.crop < self.resize:
            off = (self.resize - self.crop) // 2
            x = x[..., off:off + self.crop, off:off + self.crop]
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std


class ClipImageEncoder:
    """Unit-norm CLIP image embeddings of video frames, from a local model directory."""

    def __init__(self, model_dir: str, device: str = "cpu", batch_size: int = 32) -> None:
        from transformers import CLIPVisionModelWithProjection
        from transformers.utils import logging as hf_logging

        local = storage.local_copy(model_dir)
        if not os.path.exists(os.path.join(local, "config.json")):
            raise FileNotFoundError(f"CLIP model directory {model_dir} has no config.json")
        level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()  # a full CLIPModel dir lists its text tower as "unexpected"
        hf_logging.disable_progress_bar()
        try:
            self.model = CLIPVisionModelWithProjection.from_pretrained(local, local_files_only=True)
        finally:
            hf_logging.set_verbosity(level)
            if bars:
                hf_logging.enable_progress_bar()
        self.model = self.model.eval().to(device)
        self.preprocess = ClipPreprocess.from_dir(local, int(self.model.config.image_size))
        self.device, self.batch_size, self.source = device, batch_size, model_dir

    def __call__(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 frames [T, H, W, 3] -> unit-norm embeddings float32 [T, D]."""
        out: list[torch.Tensor] = []
        with torch.inference_mode():
            for i in range(0, frames.shape[0], self.batch_size):
                pixels = self.preprocess(frames[i:i + self.batch_size]).to(self.device)
                out.append(self.model(pixel_values=pixels).image_embeds.float().cpu())
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)


def f_consistency(embeddings: torch.Tensor, k: int | None = 4) -> float:
    """100 x mean cosine between frame 1 and frames 2..k+1 (all other frames when k is None).

    embeddings: [T, D] (normalised here, so raw features work too), T >= 2.
    """
    if embeddings.ndim != 2 or embeddings.shape[0] < 2:
        raise ValueError(f"F-Consistency needs embeddings [T >= 2, D], got {tuple(embeddings.shape)}")
    e = torch.nn.functional.normalize(embeddings.double(), dim=-1)
    others = e[1:] if k is None else e[1:k + 1]
    return float((others @ e[0]).mean() * 100.0)


def video_f_consistency(encoder: ClipImageEncoder, frames: np.ndarray) -> dict[str, float]:
    """{"f_consistency_4", "f_consistency_all"} of one video (uint8 [T, H, W, 3])."""
    emb = encoder(frames)
    return {"f_consistency_4": f_consistency(emb, 4), "f_consistency_all": f_consistency(emb, None)}
