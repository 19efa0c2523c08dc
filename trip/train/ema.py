"""EMA of the weights, kept on each rank's own ZeRO-3 partition.

Under ZeRO-3 a rank holds 1/W of every parameter (`p.ds_tensor`); an EMA of the full
weights on every rank would cost W times the memory and an all-gather per step. So each
rank averages its own partition (no communication per step); the full weights are
gathered only when a checkpoint is written, into one world-size-independent safetensors
file that resumes at any world size by slicing the local partition out again.
Without ZeRO-3 (no `ds_tensor`) the EMA covers the whole parameter.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def local_part(p: nn.Parameter) -> torch.Tensor:
    """This rank's flat partition of `p` (ZeRO-3) or the whole parameter."""
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


GATHER_BUCKET_ELEMENTS = 1 << 26  # per rank and collective: 256 MB of float32


@torch.no_grad()
def gather_full(named: list[tuple[str, nn.Parameter]], parts: list[torch.Tensor] | None = None,
                bucket_elements: int = GATHER_BUCKET_ELEMENTS) -> dict[str, torch.Tensor]:
    """Full float32 CPU tensors from every rank's partition (`parts`, default the live ones).

    Partitions are concatenated into buckets of up to `bucket_elements` per rank and each
    bucket is gathered in one collective: one all-gather per parameter would cost a network
    round trip per tensor (hundreds of them) on every checkpoint.
    Collective under ZeRO-3: every rank must call it, in the same order.
    """
    _, world = _dist()
    out: dict[str, torch.Tensor] = {}
    bucket: list[tuple[str, nn.Parameter, torch.Tensor]] = []
    filled = 0

    def flush() -> None:
        nonlocal bucket, filled
        if not bucket:
            return
        flat = torch.cat([local.reshape(-1) for _, _, local in bucket])
        gathered = torch.empty(world * flat.numel(), dtype=flat.dtype, device=flat.device)
        dist.all_gather_into_tensor(gathered, flat)
        gathered = gathered.view(world, -1)  # row r: rank r's partitions, in bucket order
        offset = 0
        for name, p, local in bucket:
            n = local.numel()  # every rank's partition of p has this size (the last one padded)
            out[name] = gathered[:, offset: offset + n].reshape(-1)[: p.ds_numel].view(p.ds_shape).cpu()
            offset += n
        bucket, filled = [], 0

    for i, (name, p) in enumerate(named):
        local = (parts[i] if parts is not None else local_part(p)).detach().float()
        if not hasattr(p, "ds_tensor"):
            out[name] = local.clone().cpu()
            continue
        if filled and filled + local.numel() > bucket_elements:
            flush()
        bucket.append((name, p, local))
        filled += local.numel()
    flush()
    return {name: out[name] for name, _ in named}


class PartitionedEMA:
    """shadow = decay * shadow + (1 - decay) * weights, on local partitions only."""

    def __init__(self, named: list[tuple[str, nn.Parameter]], decay: float) -> None:
        self.decay, self.named = decay, named
        self.shadow = [local_part(p).detach().float().clone() for _, p in named]

    @torch.no_grad()
    def update(self) -> None:
        for s, (_, p) in zip(self.shadow, self.named):
            s.lerp_(local_part(p).float(), 1.0 - self.decay)

    def full_state(self) -> dict[str, torch.Tensor]:
        """Every parameter's full EMA tensor (collective)."""
        return gather_full(self.named, self.shadow)

    @torch.no_grad()
    def load_full_state(self, state: dict[str, torch.Tensor]) -> None:
        """Take this rank's slice of full EMA tensors (saved at any world size)."""
        rank, world = _dist()
        missing = [n for n, _ in self.named if n not in state]
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} parameters, e.g. {missing[:3]}")
        for s, (name, p) in zip(self.shadow, self.named):
            flat = state[name].float().flatten().to(s.device)
            if hasattr(p, "ds_tensor"):
                size = s.numel()  # ZeRO-3 partition: ceil(numel / world), the last one padded
                start = min(rank * size, flat.numel())
                stop = min(start + size, flat.numel())
                s.zero_()
                s.view(-1)[: stop - start].copy_(flat[start:stop])
            else:
                s.copy_(flat.view_as(s))
