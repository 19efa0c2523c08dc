"""The baseline of `bench.train_overhead`: a bare DeepSpeed ZeRO loop over one in-memory batch.

Same model, DeepSpeed config, micro-batch, accumulation and thread count as the training
stack (`trip.train.loop`), and nothing else: no loader, metrics, EMA or checkpoints. It runs
under torchrun:

    torchrun --nproc_per_node 2 -m bench.bare_deepspeed CONFIG STEPS [key=value ...]

or inside Ray Train workers (`step_times`, called by the benchmark), which separates what
Ray's processes cost from what the stack's own code costs.
"""

from __future__ import annotations

import json
import os
import sys
import time


def step_times(config: str, overrides: list[str], steps: int) -> list[float]:
    """Seconds of each optimizer step (all micro-steps of one global batch) on this rank."""
    import deepspeed  # only in the rank processes, as in trip.train.loop
    import torch
    import torch.distributed as dist

    from trip.config import load_config
    from trip.diffusion import TRIPObjective
    from trip.model import TRIPModel
    from trip.train.ds_config import deepspeed_config

    cfg = load_config(config, overrides)
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))  # as the stack does on CPU
    torch.manual_seed(cfg.train.seed)
    model = TRIPModel(cfg.model, cfg.diffusion)
    groups = model.param_groups()
    params = [{"params": groups["unet"], "lr": cfg.train.lr_unet},
              {"params": groups["fusion"], "lr": cfg.train.lr_fusion}]
    accum = cfg.grad_accum_steps(world)
    ds = deepspeed_config(cfg.train, micro_batch_size=cfg.data.micro_batch_size, grad_accum=accum,
                          world_size=world, on_gpu=False)
    engine, *_ = deepspeed.initialize(model=TRIPObjective(model), model_parameters=params, config=ds)
    m, b = cfg.model, cfg.data.micro_batch_size
    latents = torch.randn(b, m.latent_channels, m.num_frames, *m.latent_hw)
    image = latents[:, :, 0].contiguous()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        for _ in range(accum):
            loss = engine(latents, image)
            engine.backward(loss)
            engine.step()
        times.append(time.perf_counter() - t0)
    return times


def ray_train_loop(loop_config: dict) -> None:
    """Ray Train entry point: the same loop; rank 0 writes its step times to `loop_config["out"]`
    (a local file: the benchmark runs on one machine)."""
    import ray.train

    times = step_times(loop_config["config"], loop_config["overrides"], loop_config["steps"])
    if ray.train.get_context().get_world_rank() == 0:
        with open(loop_config["out"], "w") as fh:
            json.dump(times, fh)


if __name__ == "__main__":
    config, steps, *overrides = sys.argv[1:]
    times = step_times(config, overrides, int(steps))
    if int(os.environ.get("RANK", "0")) == 0:
        print("BARE_TIMES", json.dumps(times), flush=True)
