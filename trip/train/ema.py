"""EMA of the weights, kept on each rank's own ZeRO-3 partition.

Under ZeRO-3 a rank holds 1/W of every parameter (`p.ds_tensor`); an EMA of the full
weights on every rank would cost W times the memory and an all-gather per step. So each
rank averages its own partition (no communication per step) and checkpoints only that
partition (`trip.train.partitions`); a resume at another world size rebuilds each rank's
slice from the two or three old files that overlap it, and `trip export` consolidates the
full EMA offline. Nothing here ever holds the full model. Without ZeRO-3 (no `ds_tensor`)
the EMA covers the whole parameter.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn


def local_part(p: nn.Parameter) -> torch.Tensor:
    """This rank's flat partition of `p` (ZeRO-3) or the whole parameter."""
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


class PartitionedEMA:
    """shadow = decay * shadow + (1 - decay) * weights, on local partitions only."""

    def __init__(self, named: list[tuple[str, nn.Parameter]], decay: float) -> None:
        self.decay, self.named = decay, named
        self.shadow = [local_part(p).detach().float().clone() for _, p in named]

    @torch.no_grad()
    def update(self) -> None:
        for s, (_, p) in zip(self.shadow, self.named):
            s.lerp_(local_part(p).float(), 1.0 - self.decay)

    @torch.no_grad()
    def load_partitions(self, parts: dict[str, torch.Tensor], strip: Callable[[str], str] = str) -> None:
        """Take this rank's partitions (name -> flat tensor of this rank's partition size, or
        the whole parameter when it is not partitioned), e.g. from `partitions.read_local_partitions`."""
        missing = [strip(n) for n, _ in self.named if strip(n) not in parts]
        if missing:
            raise ValueError(f"EMA checkpoint lacks {len(missing)} parameters, e.g. {missing[:3]}")
        for s, (name, _) in zip(self.shadow, self.named):
            src = parts[strip(name)].float().reshape(-1)
            if src.numel() != s.numel():
                raise ValueError(f"EMA of {strip(name)}: {src.numel()} elements for a partition of {s.numel()}")
            s.copy_(src.view_as(s))
