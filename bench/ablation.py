"""The paper's ablations on the synthetic motion task: TNF vs linear fusion vs no shortcut
vs channel conditioning, equal steps and seeds, scored without any network weights.

    python -m bench.ablation [--steps 300] [--seeds 0 1 2] [--variants tnf linear none channel]
                             [--residual-loss-weight 0] [--jobs 2] [--downscale 8] [--batch 32]

Variants (the paper's names): `tnf` = TRIP (temporal conditioning + TNF), `linear` = TRIP^W
(lambda falling linearly over frames), `none` = TRIP^- (no image noise prior: the UNet
predicts the noise), `channel` = TRIP_C (the image latent concatenated on channels, TNF).

The task is the demo's: coloured shapes, each colour moving one way (data_tools.synth,
motion="by_color"), 32x32 pixels x 8 frames through the lossless codec (latents 192x4x4),
64 training clips and 8 held-back ones. Every variant trains the tiny model of
`pipelines/configs/tiny_cpu.yaml` in one process (plain PyTorch AdamW, the same objective,
learning rates, warmup, EMA and batch as the demo; no Ray or DeepSpeed: this compares
models, not the platform), then its EMA weights are scored on the held-back clips:
validation loss (fixed noise and timesteps, `trip.train.validation`), and sample videos
from their first frames against the true clips: last-frame PSNR and displacement ratio
(`trip.eval.quality`). Each figure is the mean over seeds, with the spread (min-max).
Runs go `--jobs` at a time, one thread each. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "pipelines" / "configs" / "tiny_cpu.yaml"
VARIANTS = {"tnf": [], "linear": ["model.fusion.mode=linear"], "none": ["model.fusion.mode=none"],
            "channel": ["model.image_conditioning=channel"]}
PAPER_NAMES = {"tnf": "TRIP (TNF)", "linear": "TRIP^W (linear)", "none": "TRIP^- (no prior)",
               "channel": "TRIP_C (channel)"}


def prepare(root: str, videos: int = 64, holdout: int = 8, downscale: int = 8) -> dict[str, str]:
    """Synthetic clips -> lossless latents in .pt files (train, held-out) + held-out frames."""
    import numpy as np
    import torch

    from data_tools.decode import SamplingSpec, decode_clip
    from data_tools.synth import make_dataset
    from trip.codec import LosslessCodec

    make_dataset(os.path.join(root, "webvid"), num=videos, seed=0, size=64, seconds=2.0, fps=8,
                 holdout=holdout, motion="by_color")
    spec = SamplingSpec(num_frames=8, fps=4.0, resolution=32)
    codec = LosslessCodec(downscale)

    def encode(paths: list[Path]) -> tuple[torch.Tensor, np.ndarray]:
        frames = np.stack([decode_clip(str(p), spec).frames for p in paths])
        lat = torch.stack([codec.encode(torch.from_numpy(f).permute(0, 3, 1, 2).float() / 255) for f in frames])
        return lat.permute(0, 2, 1, 3, 4).contiguous(), frames  # [N, C, F, h, w], uint8 [N, F, H, W, 3]

    train, _ = encode(sorted(Path(root, "webvid", "videos").rglob("*.mp4")))
    held, frames = encode(sorted(Path(root, "webvid", "holdout").glob("*.mp4")))
    out = {"train": os.path.join(root, "train.pt"), "held": os.path.join(root, "held.pt")}
    torch.save(train, out["train"])
    torch.save({"latents": held, "frames": torch.from_numpy(frames)}, out["held"])
    return out


def run_variant(variant: str, seed: int, steps: int, data: dict[str, str], residual_weight: float,
                batch: int = 32, downscale: int = 8, overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """Train one variant from scratch and score its EMA weights (runs in a worker process)."""
    import copy

    import torch

    from trip.codec import LosslessCodec
    from trip.config import load_config
    from trip.diffusion import TRIPObjective
    from trip.eval.quality import clip_quality, summarize
    from trip.model import TRIPModel
    from trip.pipeline import TRIPPipeline
    from trip.sampling import generate
    from trip.train.ds_config import lr_factor
    from trip.train.validation import ValidationSet, validation_loss
    from trip.video import to_uint8

    torch.set_num_threads(1)
    cfg = load_config(TINY, [*VARIANTS[variant], f"train.max_steps={steps}", f"train.seed={seed}",
                             f"train.residual_loss_weight={residual_weight}", f"codec.downscale={downscale}",
                             f"model.latent_channels={3 * downscale**2}", f"model.latent_size={32 // downscale}",
                             *overrides])
    train = torch.load(data["train"], weights_only=True)  # our own tensors, written by prepare()
    held = torch.load(data["held"], weights_only=True)
    torch.manual_seed(seed)
    model = TRIPModel(cfg.model, cfg.diffusion)
    objective = TRIPObjective(model, 0.0, cfg.train.residual_loss_weight).train()
    groups = model.param_groups()
    opt = torch.optim.AdamW([{"params": groups["unet"], "lr": cfg.train.lr_unet},
                             {"params": groups["fusion"], "lr": cfg.train.lr_fusion}],
                            betas=cfg.train.betas, weight_decay=cfg.train.weight_decay)
    base = [g["lr"] for g in opt.param_groups]
    ema = copy.deepcopy(model).eval()
    g = torch.Generator().manual_seed(seed)
    t0, losses = time.perf_counter(), []
    for step in range(steps):
        for group, lr in zip(opt.param_groups, base):
            group["lr"] = lr * lr_factor(step, cfg.train)
        idx = torch.randint(0, train.shape[0], (batch,), generator=g)
        lat = train[idx]
        t = torch.randint(0, cfg.diffusion.num_train_timesteps, (batch,), generator=g)
        noise = torch.randn(lat.shape, generator=g)
        loss = objective(lat, lat[:, :, cfg.data.image_frame], None, timesteps=t, noise=noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - cfg.train.ema_decay)
        losses.append(float(loss.detach()))
    train_s = time.perf_counter() - t0
    lat = held["latents"]
    val = ValidationSet(lat, lat[:, :, 0].clone(), None, [str(i) for i in range(lat.shape[0])], {})
    codec = LosslessCodec(downscale)
    images = torch.stack([codec.decode(lat[i, :, :1].permute(1, 0, 2, 3))[0] for i in range(lat.shape[0])])
    videos = generate(TRIPPipeline.from_trip_model(ema, codec), images, cfg.sample)
    per = {str(i): clip_quality(to_uint8(v), held["frames"][i].numpy()) for i, v in enumerate(videos)}
    s = summarize(per)
    return {"variant": variant, "seed": seed, "steps": steps, "val_loss": validation_loss(ema, val),
            "psnr_last": s["psnr_last"], "psnr": s["psnr"], "displacement_ratio": s.get("displacement_ratio", 0.0),
            "displacement_ratio_min": s.get("displacement_ratio_min", 0.0),
            "train_loss_last50": statistics.mean(losses[-50:]), "train_seconds": train_s}


def _spread(values: list[float]) -> str:
    mean = statistics.mean(values)
    return f"{mean:.3f} ({min(values):.3f}-{max(values):.3f})" if len(values) > 1 else f"{mean:.3f}"


def main(steps: int = 300, seeds: tuple[int, ...] = (0, 1, 2), variants: tuple[str, ...] = tuple(VARIANTS),
         residual_weight: float = 0.0, jobs: int = 2, downscale: int = 8, batch: int = 32,
         overrides: tuple[str, ...] = ()) -> list[dict]:
    from bench.common import row

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="trip-ablation-") as root:
        data = prepare(root, downscale=downscale)
        runs = [(v, s) for s in seeds for v in variants]
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            futures = [pool.submit(run_variant, v, s, steps, data, residual_weight, batch, downscale, overrides)
                       for v, s in runs]
            results = []
            for f in futures:
                results.append(f.result())
                r = results[-1]
                print(f"[ablation] {r['variant']:<8} seed {r['seed']}: val loss {r['val_loss']:.4f}, "
                      f"last-frame PSNR {r['psnr_last']:.1f} dB, displacement ratio {r['displacement_ratio']:.2f} "
                      f"(min {r['displacement_ratio_min']:.2f}), {r['train_seconds']:.0f} s", flush=True)
    by = {v: [r for r in results if r["variant"] == v] for v in variants}
    print(f"\n{steps} steps x batch {batch}, seeds {list(seeds)}, residual_loss_weight {residual_weight}, lossless "
          f"codec x{downscale}{', ' + ' '.join(overrides) if overrides else ''}; mean (min-max) over seeds")
    print(f"{'variant':<20} {'val loss':>22} {'last-frame PSNR dB':>22} {'displacement ratio':>22}")
    figures: dict[str, Any] = {"bench": "ablation", "steps": steps, "batch": batch, "seeds": len(seeds),
                               "residual_loss_weight": residual_weight, "downscale": downscale,
                               "overrides": list(overrides)}
    for v, rs in by.items():
        cols = [[r[k] for r in rs] for k in ("val_loss", "psnr_last", "displacement_ratio")]
        print(f"{PAPER_NAMES[v]:<20} {_spread(cols[0]):>22} {_spread(cols[1]):>22} {_spread(cols[2]):>22}")
        for k, c in zip(("val_loss", "psnr_last", "displacement_ratio"), cols):
            figures[f"{k}_{v}"] = round(statistics.mean(c), 4)
    rows = []
    if "tnf" in by:
        for v in by:
            if v != "tnf":
                rows.append(row("ablation", f"validation loss, TNF / {v}", figures["val_loss_tnf"],
                                f"{v} (same steps, seeds)", figures[f"val_loss_{v}"]))
    figures["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps({k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in figures.items()}))
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    ap.add_argument("--batch", type=int, default=32, help="samples per step")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config overrides of every run, e.g. train.lr_unet=4e-3")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--residual-loss-weight", type=float, default=0.0,
                    help="train.residual_loss_weight of every run (0: the paper's loss)")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    ap.add_argument("--downscale", type=int, default=8, choices=[2, 4, 8],
                    help="lossless codec factor: 8 is the demo's (latents 192x4x4), 4 gives 48x8x8")
    a = ap.parse_args()
    main(a.steps, tuple(a.seeds), tuple(a.variants), a.residual_loss_weight, a.jobs, a.downscale, a.batch,
         tuple(a.set))
