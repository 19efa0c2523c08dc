"""A committed checkpoint written the way the training ranks write one, without training."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from trip.train import checkpoint as ckpt


def fake_checkpoint(run_root: Path, step: int, world: int = 2, complete: bool = True, cfg=None,
                    state: dict[str, torch.Tensor] | None = None) -> Path:
    """A committed checkpoint as `world` ZeRO-3 ranks write it: DeepSpeed files (dummy bytes),
    per-rank weight and EMA partitions (EMA = weights + 1) of `state` (default: a freshly
    initialised model of `cfg`, default tiny_cpu.yaml), the record."""
    from trip import storage
    from trip.config import load_config
    from trip.model import TRIPModel
    from trip.train import partitions

    cfg = cfg or load_config(Path(__file__).resolve().parents[2] / "pipelines" / "configs" / "tiny_cpu.yaml")
    if state is None:
        torch.manual_seed(step)
        state = TRIPModel(cfg.model, cfg.diffusion).state_dict()
    run = ckpt.RunDir(str(run_root.parent), run_root.name)
    root = Path(storage.local_path(run.checkpoint_url(step)))
    files = {}
    for r in range(world):
        for kind in ("model", "optim"):
            rel = f"{ckpt.DS_TAG}/zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(b"x" * (r + 1))
            files[rel] = r + 1
        for kind, shift in (("weights", 0.0), ("ema", 1.0)):
            entries = []
            for name, t in state.items():
                s = math.ceil(t.numel() / world)
                flat = torch.zeros(s * world)
                flat[: t.numel()] = t.flatten() + shift
                entries.append((name, flat[r * s:(r + 1) * s].clone(), t.numel(), tuple(t.shape), True))
            rel = ckpt.partition_file(kind, r, world)
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            partitions.write_partitions(str(root / rel), entries, rank=r, world_size=world, kind=kind)
            files[rel] = (root / rel).stat().st_size
    ckpt.write_json(str(root / ckpt.RECORD), {
        "format": ckpt.FORMAT, "step": step, "world_size": world, "config": cfg.to_dict(),
        "config_hash": cfg.hash(), "loader": None, "files": files})
    if not complete:  # rank 1's upload never arrived
        (root / f"{ckpt.DS_TAG}/zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    return root
