"""Image (+ optional caption embedding) -> video.

DDIM (50 steps by default) over the frame latents. The image noise prior is recomputed
from the image latent at every step inside the model's forward, exactly as in training.
Classifier-free guidance mixes the prediction with and without text. Deterministic given
a seed: the initial noise and DDIM's stochastic term come from one seeded CPU generator.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F

from trip.codec import LatentCodec, build_codec
from trip.config import CodecConfig, SampleConfig, config_from_dict
from trip.diffusion import sample_scheduler
from trip.model import TRIPModel


@torch.no_grad()
def sample_latents(model: TRIPModel, image_latents: torch.Tensor, text_states: torch.Tensor | None = None,
                   *, steps: int = 50, guidance_scale: float = 1.0, eta: float = 0.0,
                   seed: int = 0, progress: bool = False) -> torch.Tensor:
    """Denoise a clip conditioned on its first frame.

    Args:
        image_latents: [B, C, H, W] clean latent of the given images.
        text_states: [B, L, D] caption embedding, or None.

    Returns:
        Video latents [B, C, F, H, W] (float32).
    """
    if image_latents.ndim != 4:
        raise ValueError(f"image_latents must be [B, C, H, W], got {tuple(image_latents.shape)}")
    model.eval()
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    b = image_latents.shape[0]
    c, f, s = model.cfg.latent_channels, model.cfg.num_frames, model.cfg.latent_size
    gen = torch.Generator().manual_seed(seed)
    scheduler = sample_scheduler(model.diffusion_cfg)
    scheduler.set_timesteps(steps)
    z = torch.randn((b, c, f, s, s), generator=gen) * scheduler.init_noise_sigma
    z = z.to(device)
    image = image_latents.to(device, dtype)
    guided = text_states is not None and guidance_scale != 1.0
    text = text_states.to(device, dtype) if text_states is not None else None
    timesteps = scheduler.timesteps
    if progress:
        from tqdm import tqdm

        timesteps = tqdm(timesteps, desc="sampling", leave=False)
    for t in timesteps:
        tt = torch.full((b,), int(t), device=device, dtype=torch.long)
        if guided:
            both = model(torch.cat([z, z]).to(dtype), torch.cat([image, image]), torch.cat([tt, tt]),
                         torch.cat([text, torch.zeros_like(text)]))
            cond, uncond = both.noise.float().chunk(2)
            eps = uncond + guidance_scale * (cond - uncond)
        else:
            eps = model(z.to(dtype), image, tt, text).noise.float()
        noise = torch.randn(z.shape, generator=gen).to(device) if eta > 0 else None
        z = scheduler.step(eps.cpu(), t, z.cpu(), eta=eta, variance_noise=noise.cpu() if noise is not None else None
                           ).prev_sample.to(device)
    return z.float()


def decode_video(codec: LatentCodec, latents: torch.Tensor) -> torch.Tensor:
    """[C, F, h, w] latents -> [F, 3, H, W] frames in [0, 1]."""
    return codec.decode(latents.permute(1, 0, 2, 3))


def prepare_image(frame: torch.Tensor, size: int) -> torch.Tensor:
    """[3, H, W] in [0, 1] -> centre-cropped square resized to size x size."""
    _, h, w = frame.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = frame[:, top:top + side, left:left + side]
    if side != size:
        crop = F.interpolate(crop[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    return crop.clamp(0, 1)


def generate(model: TRIPModel, codec: LatentCodec, images: torch.Tensor, text_states: torch.Tensor | None = None,
             cfg: SampleConfig | None = None, progress: bool = False) -> torch.Tensor:
    """Images [B, 3, H, W] in [0, 1] -> videos [B, F, 3, H, W] in [0, 1]."""
    cfg = cfg or SampleConfig()
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
    image_latents = codec.encode(images)
    z = sample_latents(model, image_latents, text_states, steps=cfg.steps, guidance_scale=cfg.guidance_scale,
                       eta=cfg.eta, seed=cfg.seed, progress=progress)
    return torch.stack([decode_video(codec, z[i].cpu()) for i in range(z.shape[0])])


def load_model_and_codec(path: str, device: str = "cpu") -> tuple[TRIPModel, LatentCodec, SampleConfig]:
    """A `trip export` directory -> (model, codec, default sample settings)."""
    from trip.storage import local_copy

    model = TRIPModel.from_pretrained(path).to(device)
    with open(os.path.join(local_copy(path), "config.json")) as fh:
        raw = json.load(fh)
    codec_cfg = config_from_dict(raw.get("codec", {}), f"{path}/config.json:codec", CodecConfig)
    sample_cfg = config_from_dict(raw.get("sample", {}), f"{path}/config.json:sample", SampleConfig)
    return model, build_codec(codec_cfg, device), sample_cfg


def cli(args: argparse.Namespace) -> int:
    """`trip sample`: write one MP4 and one GIF per input image."""
    from dataclasses import replace

    from trip.video import read_frames, write_gif, write_mp4

    model, codec, sample_cfg = load_model_and_codec(args.model)
    overrides = {k: v for k, v in {"steps": args.steps, "guidance_scale": args.guidance_scale,
                                   "seed": args.seed, "fps": args.fps}.items() if v is not None}
    sample_cfg = replace(sample_cfg, **overrides)
    size = model.cfg.latent_size * codec.downscale
    os.makedirs(args.out, exist_ok=True)
    for path in args.image:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image not found: {path}")
        image = prepare_image(read_frames(path, max_frames=1)[0], size)
        video = generate(model, codec, image[None], cfg=sample_cfg, progress=True)[0]
        stem = os.path.splitext(os.path.basename(path))[0]
        mp4 = write_mp4(video, os.path.join(args.out, f"{stem}.mp4"), fps=sample_cfg.fps)
        gif = write_gif(video, os.path.join(args.out, f"{stem}.gif"), fps=sample_cfg.fps,
                        scale=max(1, 128 // size))
        print(f"{path} -> {mp4}, {gif}")
    return 0
