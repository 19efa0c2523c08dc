"""`trip sample`: image (+ caption) -> video files, through `TRIPPipeline`.

The denoising loop lives in one place, `trip.pipeline.TRIPPipeline` (DDIM over the frame
latents, the image noise prior recomputed at every step, classifier-free guidance); this
module only loads a model directory into a pipeline, prepares the first frames and writes
MP4 / GIF (/ PNG) files. Both export formats load: the diffusers layout directly, the older
`trip/1` directory (`config.json` + `model.safetensors`) by wrapping its TRIPModel.
Deterministic given a seed: the noise comes from one seeded CPU generator.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from trip.config import CodecConfig, SampleConfig, config_from_dict, size_hw


def prepare_image(frame: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """[3, h, w] in [0, 1] -> [3, H, W]: the largest centred crop of the target's aspect, resized
    to H x W (an int S: a centred square resized to S x S), as preprocessing crops clips."""
    out_h, out_w = size_hw(size)
    _, h, w = frame.shape
    if w * out_h >= h * out_w:  # wider than the target: keep the height
        ch, cw = h, min(w, round(h * out_w / out_h))
    else:
        ch, cw = min(h, round(w * out_h / out_w)), w
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = frame[:, top:top + ch, left:left + cw]
    if (ch, cw) != (out_h, out_w):
        crop = F.interpolate(crop[None], size=(out_h, out_w), mode="bilinear", antialias=True, align_corners=False)[0]
    return crop.clamp(0, 1)


def load_pipeline(path: str, device: str = "cpu") -> tuple[Any, SampleConfig]:
    """A `trip export` directory (either format, local or URL) -> (TRIPPipeline, its sample settings)."""
    from trip.codec import build_codec
    from trip.model import TRIPModel
    from trip.model import diffusers_layout as layout
    from trip.pipeline import LORA_WEIGHTS, TRIPPipeline
    from trip.storage import local_copy

    try:
        local = local_copy(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"TRIP model directory not found: {path}") from e
    if os.path.isfile(os.path.join(local, LORA_WEIGHTS)) and not layout.is_diffusers_dir(local):
        raise FileNotFoundError(f"{path} holds LoRA adapters only: give the base model as --model and this "
                                f"directory as --lora")
    if layout.is_diffusers_dir(local):
        with _quiet_loading():
            pipe = TRIPPipeline.from_pretrained(local).to(device)
        record = os.path.join(local, layout.RUN_RECORD)
        raw = {}
        if os.path.isfile(record):
            with open(record) as fh:
                raw = json.load(fh).get("config", {})
        sample = config_from_dict(raw.get("sample", {}), f"{record}:config.sample", SampleConfig)
        return pipe, sample
    model = TRIPModel.from_pretrained(path).to(device)
    with open(os.path.join(local, "config.json")) as fh:
        raw = json.load(fh)
    codec = build_codec(config_from_dict(raw.get("codec", {}), f"{path}/config.json:codec", CodecConfig), device)
    sample = config_from_dict(raw.get("sample", {}), f"{path}/config.json:sample", SampleConfig)
    return TRIPPipeline.from_trip_model(model, codec), sample


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """diffusers' "Loading pipeline components" bar only with --verbose (the console shows our lines)."""
    from diffusers.utils import logging as diffusers_logging

    from trip.log import verbose

    shown = diffusers_logging.is_progress_bar_enabled()
    if not verbose():
        diffusers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            diffusers_logging.enable_progress_bar()


def generate(pipe: Any, images: torch.Tensor, cfg: SampleConfig, prompt: str | None = None,
             progress: bool = False, num_frames: int | None = None) -> torch.Tensor:
    """Images [B, 3, H, W] in [0, 1] -> videos [B, F, 3, H, W] in [0, 1] with `cfg`'s settings
    (H x W: the model's frame size or another one it takes, F: `num_frames`, default the
    trained count; see `TRIPPipeline.__call__`)."""
    pipe.set_progress_bar_config(disable=not progress, leave=False, desc="sampling")
    out = pipe(image=images, prompt=prompt, num_frames=num_frames, height=images.shape[2], width=images.shape[3],
               num_inference_steps=cfg.steps, guidance_scale=cfg.guidance_scale,
               eta=cfg.eta, generator=torch.Generator().manual_seed(cfg.seed), output_type="pt")
    return out.frames.cpu()


def cli(args: argparse.Namespace) -> int:
    """`trip sample`: write one MP4 and one GIF (and with --png one PNG strip) per input image."""
    from dataclasses import replace

    from trip.video import read_frames, write_gif, write_mp4, write_png_strip

    pipe, sample_cfg = load_pipeline(args.model)
    if args.lora:
        from trip.storage import local_copy

        pipe.load_lora_weights(local_copy(args.lora))
    overrides = {k: v for k, v in {"steps": args.steps, "guidance_scale": args.guidance_scale,
                                   "seed": args.seed, "fps": args.fps}.items() if v is not None}
    sample_cfg = replace(sample_cfg, **overrides)
    trained_h, trained_w = pipe.frame_size
    size = (getattr(args, "height", None) or trained_h, getattr(args, "width", None) or trained_w)
    os.makedirs(args.out, exist_ok=True)
    for path in args.image:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image not found: {path}")
        image = prepare_image(read_frames(path, max_frames=1)[0], size)
        video = generate(pipe, image[None], sample_cfg, prompt=args.prompt, progress=True,
                         num_frames=getattr(args, "num_frames", None))[0]
        stem = os.path.splitext(os.path.basename(path))[0]
        written = [write_mp4(video, os.path.join(args.out, f"{stem}.mp4"), fps=sample_cfg.fps),
                   write_gif(video, os.path.join(args.out, f"{stem}.gif"), fps=sample_cfg.fps,
                             scale=max(1, 128 // max(size_hw(size))))]
        if args.png:
            written.append(write_png_strip(video, os.path.join(args.out, f"{stem}.png")))
        print(f"{path} -> {', '.join(written)}")
    return 0
