"""Full weights from ZeRO-3 partitions: bucketed gathers over a real 2-process gloo group.

The parameters carry DeepSpeed's ZeRO-3 partition attributes (`ds_tensor`: this rank's
contiguous slice of the flattened tensor, padded at the end; `ds_numel`; `ds_shape`), so the
gather and the EMA's world-size-independent save/load run exactly as under an engine.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from tests.conftest import free_port
from trip.train.ema import PartitionedEMA, gather_full

SHAPES = {"conv.weight": (3, 5), "conv.bias": (7,), "attn.proj": (2, 3, 3), "norm.weight": (4,)}
REPLICATED = "norm.weight"  # no ds_tensor: a parameter ZeRO keeps whole


def _full(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(*s, generator=g) for k, s in SHAPES.items()}


def _partitioned(full: dict[str, torch.Tensor], rank: int, world: int) -> list[tuple[str, nn.Parameter]]:
    named = []
    for name, t in full.items():
        if name == REPLICATED:
            named.append((name, nn.Parameter(t.clone())))
            continue
        size = math.ceil(t.numel() / world)
        flat = torch.zeros(size * world)
        flat[: t.numel()] = t.flatten()
        p = nn.Parameter(torch.empty(0))
        p.ds_tensor, p.ds_numel, p.ds_shape = flat[rank * size:(rank + 1) * size].clone(), t.numel(), t.shape
        named.append((name, p))
    return named


def _worker(rank: int, world: int, port: int, bucket: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        full = _full(0)
        named = _partitioned(full, rank, world)
        got = gather_full(named, bucket_elements=bucket)
        assert list(got) == list(SHAPES), "parameter order changed"
        for name, t in full.items():
            assert torch.equal(got[name], t), f"rank {rank}: {name} differs after the gather"
        # EMA: a full state saved at any world size loads as this rank's slices and gathers back
        ema = PartitionedEMA(named, decay=0.5)
        target = _full(1)
        ema.load_full_state(target)
        back = ema.full_state()
        for name, t in target.items():
            assert torch.equal(back[name], t), f"rank {rank}: EMA {name} differs after load + gather"
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("bucket", [1, 20, 1 << 26], ids=["one-param-per-bucket", "mixed", "one-bucket"])
def test_gather_full_rebuilds_every_parameter_from_partitions(bucket):
    mp.spawn(_worker, args=(2, free_port(), bucket), nprocs=2, join=True)
