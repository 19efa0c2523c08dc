"""Cost of TRIP's shortcut path and TNF: forward+backward of the TRIP model vs the bare
diffusers UNet3DConditionModel of the same size on the same batch.

TRIP adds the image slot (F+1 frames through the UNet), the noise prior (elementwise) and
the TNF block; the ratio TRIP/bare time is that overhead. Tiny and mid sizes on CPU; the
base (paper) size too when a GPU is present.

    python -m bench.model_step
"""

from __future__ import annotations

import argparse

import torch
from diffusers import UNet3DConditionModel

from bench.common import print_table, row, time_pair
from trip.config import FusionConfig, ModelConfig, UNetConfig, load_config
from trip.diffusion import TRIPObjective
from trip.model import TRIPModel
from trip.model.unet import diffusers_unet_kwargs


def _sizes(device: str) -> dict[str, tuple[ModelConfig, int]]:
    sizes = {
        "tiny": (load_tiny(), 4),
        "mid": (ModelConfig(num_frames=8, latent_channels=4, latent_size=16,
                            unet=UNetConfig(block_out_channels=(64, 128, 128),
                                            down_block_types=("CrossAttnDownBlock3D",) * 2 + ("DownBlock3D",),
                                            up_block_types=("UpBlock3D",) + ("CrossAttnUpBlock3D",) * 2,
                                            layers_per_block=2, norm_num_groups=32, cross_attention_dim=256,
                                            attention_head_dim=8),
                            fusion=FusionConfig(dim=128, heads=4, depth=1, timestep_dim=128)), 2),
    }
    if device == "cuda":
        base = load_config_base()
        sizes["base"] = (base, 2)
    return sizes


def load_tiny() -> ModelConfig:
    from pathlib import Path

    return load_config(Path(__file__).resolve().parents[1] / "pipelines/configs/tiny_cpu.yaml").model


def load_config_base() -> ModelConfig:
    from dataclasses import replace
    from pathlib import Path

    cfg = load_config(Path(__file__).resolve().parents[1] / "pipelines/configs/base_256.yaml").model
    return replace(cfg, pretrained_unet=None)


def measure(name: str, cfg: ModelConfig, batch: int, device: str, dtype: torch.dtype, iters: int) -> list[dict]:
    torch.manual_seed(0)
    c, f, (h, w) = cfg.latent_channels, cfg.num_frames, cfg.latent_hw
    lat = torch.randn(batch, c, f, h, w, device=device, dtype=dtype)
    text = torch.randn(batch, 77 if device == "cuda" else 8, cfg.unet.cross_attention_dim, device=device, dtype=dtype)
    t = torch.randint(0, 1000, (batch,), device=device)

    trip = TRIPObjective(TRIPModel(cfg)).to(device, dtype)
    bare = UNet3DConditionModel(**diffusers_unet_kwargs(cfg.unet, c, c)).to(device)
    bare.to(dtype)
    if cfg.gradient_checkpointing:
        trip.model.set_gradient_checkpointing(False)  # compare like with like: bare has none

    def step_trip() -> None:
        trip(lat, lat[:, :, 0], text, timesteps=t).backward()
        _sync(device)

    def step_bare() -> None:
        noise = torch.randn_like(lat)
        out = bare(lat, t, encoder_hidden_states=text).sample
        torch.nn.functional.mse_loss(out.float(), noise.float()).backward()
        _sync(device)

    t_trip, t_bare = time_pair(step_trip, step_bare, warmup=2, iters=iters)
    n_trip = sum(p.numel() for p in trip.parameters())
    n_bare = sum(p.numel() for p in bare.parameters())
    print(f"[{name}] params TRIP {n_trip / 1e6:.2f}M vs UNet {n_bare / 1e6:.2f}M; "
          f"fwd+bwd {t_trip * 1e3:.1f} ms vs {t_bare * 1e3:.1f} ms (batch {batch}, {f} frames, {device})")
    return [row(f"model_step/{name}/{device}", "fwd+bwd seconds (TRIP)", t_trip,
                "bare diffusers UNet3D", t_bare)]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--sizes", default=None, help="comma-separated subset of tiny,mid,base")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rows = []
    for name, (cfg, batch) in _sizes(device).items():
        if args.sizes and name not in args.sizes.split(","):
            continue
        rows += measure(name, cfg, batch, device, dtype, args.iters)
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
