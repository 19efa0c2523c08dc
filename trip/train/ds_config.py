"""The DeepSpeed config of a run and its learning-rate schedule, from the `train` section.

All parallelism knobs live here: ZeRO stage and buckets, precision, gradient accumulation
(recomputed for every world size so the global batch stays fixed across resizes),
clipping, the optimizer (AdamW; DeepSpeed's `torch_adam` on CPU so nothing is compiled)
and the universal-checkpoint switch used when resuming at another world size.
"""

from __future__ import annotations

import math
from typing import Any

from trip.config import TrainConfig


def deepspeed_config(train: TrainConfig, *, micro_batch_size: int, grad_accum: int, world_size: int,
                     on_gpu: bool, load_universal: bool = False) -> dict[str, Any]:
    """DeepSpeed JSON config; `train_batch_size` = micro x accumulation x world = global batch."""
    z = train.zero
    zero: dict[str, Any] = {
        "stage": z.stage,
        "overlap_comm": z.overlap_comm,
        "contiguous_gradients": z.contiguous_gradients,
        "reduce_bucket_size": z.reduce_bucket_size,
    }
    if z.stage == 3:
        zero.update({
            "stage3_prefetch_bucket_size": z.prefetch_bucket_size,
            "stage3_param_persistence_threshold": z.param_persistence_threshold,
            "stage3_gather_16bit_weights_on_model_save": False,  # we gather weights ourselves
        })
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * world_size,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": train.precision == "bf16"},
        "optimizer": {"type": "AdamW", "params": {
            "lr": train.lr_unet, "betas": list(train.betas), "weight_decay": train.weight_decay,
            "torch_adam": not on_gpu,  # FusedAdam needs a 47 s JIT build and a GPU
        }},
        "steps_per_print": 10**9,  # progress is printed by rank 0 of our loop
        "wall_clock_breakdown": False,
        # tag validation costs two all-reduces per save; our tags are constant ("ds")
        "checkpoint": {"load_universal": load_universal, "tag_validation": "Ignore"},
    }


def lr_factor(step: int, train: TrainConfig) -> float:
    """Multiplier of the base learning rates for optimizer step `step` (0-based):
    linear warmup over `warmup_steps`, then cosine decay to `min_lr_ratio` at `max_steps`."""
    if step < train.warmup_steps:
        return (step + 1) / train.warmup_steps
    span = max(train.max_steps - train.warmup_steps, 1)
    progress = min((step - train.warmup_steps) / span, 1.0)
    return train.min_lr_ratio + (1 - train.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
