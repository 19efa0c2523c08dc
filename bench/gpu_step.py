"""Training step of the paper-scale config (pipelines/configs/base_256.yaml) on one GPU:
seconds per step, samples/s and MFU.

Random weights (no pretrained UNet download) and random latents/text states of the base
shapes; bf16 autocast with fp32 master weights and fused AdamW, gradient checkpointing as
configured. FLOPs of one forward+backward come from torch's FlopCounterMode; MFU is
achieved FLOP/s over the GPU's dense bf16 peak (table below, or TRIP_PEAK_TFLOPS). A
second row compares bf16 with fp32 (TF32) on the same batch. Without CUDA it says so and
returns no rows.

    python -m bench.gpu_step [--batch 4] [--iters 5]
"""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from pathlib import Path

import torch

from bench.common import print_table, row, time_it

ROOT = Path(__file__).resolve().parents[1]
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}


def peak_tflops(name: str) -> float | None:
    if os.environ.get("TRIP_PEAK_TFLOPS"):
        return float(os.environ["TRIP_PEAK_TFLOPS"])
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def _setup(batch: int):
    from trip.config import load_config
    from trip.diffusion import TRIPObjective
    from trip.model import TRIPModel

    cfg = load_config(ROOT / "pipelines" / "configs" / "base_256.yaml")
    mcfg = replace(cfg.model, pretrained_unet=None)
    torch.manual_seed(0)
    model = TRIPModel(mcfg, cfg.diffusion).cuda()
    model.set_gradient_checkpointing(mcfg.gradient_checkpointing)
    objective = TRIPObjective(model, cfg.train.text_dropout).train()
    groups = model.param_groups()
    opt = torch.optim.AdamW([{"params": groups["unet"], "lr": 1e-6}, {"params": groups["fusion"], "lr": 1e-5}],
                            fused=True)
    c, f, (h, w) = mcfg.latent_channels, mcfg.num_frames, mcfg.latent_hw
    lat = torch.randn(batch, c, f, h, w, device="cuda")
    img = lat[:, :, 0].clone()
    text = torch.randn(batch, 77, mcfg.unet.cross_attention_dim, device="cuda")
    return objective, opt, (lat, img, text)


def _step_fn(objective, opt, inputs, dtype: torch.dtype):
    def step() -> None:
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            loss = objective(*inputs)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
    return step


def _flops(objective, inputs) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.autocast("cuda", dtype=torch.bfloat16):
        objective(*inputs).backward()
    objective.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def main(batch: int = 4, iters: int = 5) -> list[dict]:
    if not torch.cuda.is_available():
        print("bench.gpu_step: no GPU (CUDA) on this machine; nothing measured")
        return []
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name()
    objective, opt, inputs = _setup(batch)
    flops = _flops(objective, inputs)
    bf16 = time_it(_step_fn(objective, opt, inputs, torch.bfloat16), warmup=2, iters=iters)
    fp32 = time_it(_step_fn(objective, opt, inputs, torch.float32), warmup=1, iters=max(2, iters // 2))
    achieved = flops / bf16 / 1e12
    peak = peak_tflops(name)
    mem = torch.cuda.max_memory_allocated() / 2**30
    print(f"{name}: batch {batch}, {flops / 1e12:.2f} TFLOP per step, bf16 {bf16:.3f} s/step "
          f"({batch / bf16:.2f} samples/s), fp32/TF32 {fp32:.3f} s/step, peak memory {mem:.1f} GiB")
    rows = [row("gpu_step", f"samples/s bf16 (batch {batch})", batch / bf16, "fp32/TF32 same batch", batch / fp32)]
    if peak:
        rows.append(row("gpu_step", "achieved TFLOP/s bf16 (ratio = MFU)", achieved, f"{name} dense bf16 peak",
                        peak))
    else:
        print(f"unknown peak for {name}: set TRIP_PEAK_TFLOPS for the MFU row")
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--iters", type=int, default=5)
    a = ap.parse_args()
    print_table(main(a.batch, a.iters))
