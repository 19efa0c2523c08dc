"""What LoRA saves against full fine-tuning, on the mid-size model, in the training stack's engine.

Both arms are the same mid-size TRIP model (bench.model_step's "mid") in a DeepSpeed ZeRO-3
engine built exactly as `trip.train.loop` builds it (`deepspeed_config`, `TRIPObjective`,
AdamW), in this process at world size 1 over gloo:
- full fine-tuning: every parameter trains;
- LoRA: `trip.model.lora.add_adapters` (rank 8, alpha 8, the UNet's attention projections),
  the base frozen; the checkpoint is saved as the loop saves it (frozen parameters excluded).
Measured: trainable parameters, optimizer-state bytes (the size of DeepSpeed's ZeRO optimizer
file of a checkpoint: fp32 master weights and both Adam moments of what trains), and the
time of one optimizer step on the same batch, the arms timed alternately (medians) so load
from other processes hits both alike. Ratios are LoRA / full. The last line printed is one
JSON object.

    python -m bench.lora [--iters 5] [--rank 8]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import tempfile
from typing import Any

import torch

from bench.common import free_port, print_table, row, time_pair


def _mid_config():
    from bench.model_step import _sizes

    cfg, batch = _sizes("cpu")["mid"]
    return cfg, batch


def _engine(model_cfg: Any, lora: Any | None) -> tuple[Any, int]:
    """(DeepSpeed engine, trainable parameters) of the mid model, full or with LoRA adapters."""
    import deepspeed

    from trip.config import DiffusionConfig, TrainConfig, ZeroConfig
    from trip.diffusion import TRIPObjective
    from trip.model import TRIPModel
    from trip.model.lora import add_adapters
    from trip.train.ds_config import deepspeed_config

    torch.manual_seed(0)
    model = TRIPModel(model_cfg, DiffusionConfig())
    if lora is not None:
        add_adapters(model, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)  # before ZeRO-3 partitions them
    groups = model.param_groups()
    params = [{"params": groups[n], "lr": 1e-4} for n in ("unet", "fusion") if groups[n]]
    train = TrainConfig(zero=ZeroConfig(stage=3, param_persistence_threshold=0))
    ds = deepspeed_config(train, micro_batch_size=2, grad_accum=1, world_size=1, on_gpu=False)
    engine, *_ = deepspeed.initialize(model=TRIPObjective(model), model_parameters=params, config=ds)
    return engine, trainable


def _optimizer_bytes(engine: Any, exclude_frozen: bool) -> tuple[int, int]:
    """(ZeRO optimizer file bytes, whole DeepSpeed checkpoint bytes) of a checkpoint of `engine`."""
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmp:
        engine.save_checkpoint(tmp, tag="t", exclude_frozen_parameters=exclude_frozen)
        optim = sum(os.path.getsize(p) for p in glob.glob(os.path.join(tmp, "t", "*optim_states.pt")))
        total = sum(os.path.getsize(p) for p in glob.glob(os.path.join(tmp, "t", "*")))
    return optim, total


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=5, help="timed optimizer steps per arm")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (both arms)")
    args = ap.parse_args(argv)

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0",
                       "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    import deepspeed

    from trip.config import LoraConfig
    from trip.log import prints_to_debug

    torch.set_num_threads(args.threads)
    deepspeed.init_distributed(dist_backend="gloo")
    cfg, batch = _mid_config()
    lora = LoraConfig(rank=args.rank, alpha=float(args.rank))
    with prints_to_debug(__name__):
        full, n_full = _engine(cfg, None)
        adapted, n_lora = _engine(cfg, lora)
    torch.manual_seed(1)
    c, f, (h, w) = cfg.latent_channels, cfg.num_frames, cfg.latent_hw
    latents = torch.randn(batch, c, f, h, w)
    image = latents[:, :, 0].contiguous()

    def step(engine: Any):
        def run() -> None:
            loss = engine(latents, image)
            engine.backward(loss)
            engine.step()
        return run

    t_lora, t_full = time_pair(step(adapted), step(full), warmup=2, iters=args.iters)
    with prints_to_debug(__name__):
        opt_full, ckpt_full = _optimizer_bytes(full, exclude_frozen=False)
        opt_lora, ckpt_lora = _optimizer_bytes(adapted, exclude_frozen=True)
    rows = [
        row("lora/mid", "trainable parameters", n_lora, "full fine-tuning", n_full),
        row("lora/mid", "optimizer-state bytes", opt_lora, "full fine-tuning", opt_full),
        row("lora/mid", "checkpoint bytes (DeepSpeed files)", ckpt_lora, "full fine-tuning", ckpt_full),
        row("lora/mid", "optimizer step seconds", t_lora, "full fine-tuning", t_full),
    ]
    print_table(rows)
    result = {"benchmark": "lora", "model": "mid", "lora_rank": args.rank, "lora_alpha": lora.alpha,
              "target_modules": list(lora.target_modules), "batch": batch, "threads": args.threads,
              "trainable_params": {"lora": n_lora, "full": n_full, "ratio": n_lora / n_full},
              "optimizer_state_bytes": {"lora": opt_lora, "full": opt_full, "ratio": opt_lora / opt_full},
              "checkpoint_bytes": {"lora": ckpt_lora, "full": ckpt_full, "ratio": ckpt_lora / ckpt_full},
              "step_seconds": {"lora": t_lora, "full": t_full, "ratio": t_lora / t_full}}
    print(json.dumps(result), flush=True)
    return rows


if __name__ == "__main__":
    main()
