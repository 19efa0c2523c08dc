"""Take a checkpoint's state off the training path: copy it to host memory, serialize later.

DeepSpeed writes its ZeRO files through a pluggable checkpoint engine whose `save(state,
path)` normally runs `torch.save` at once, so the training step waits for serialization
and the disk. `SnapshotEngine.save` only copies the state's tensors to host memory (a
memcpy of this rank's share: 1/W of the model and its Adam state) and remembers the path;
`write_snapshots` does the `torch.save`s afterwards, on the checkpoint writer's thread,
while training goes on. The copies are needed because the next optimizer step updates the
live tensors in place.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine


def host_copy(obj: Any) -> Any:
    """`obj` with every tensor copied to host memory (containers rebuilt, other leaves kept)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, OrderedDict):
        return OrderedDict((k, host_copy(v)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: host_copy(v) for k, v in obj.items()}
    if type(obj) is list:
        return [host_copy(v) for v in obj]
    if type(obj) is tuple:  # not torch.Size or named tuples: those are kept as they are
        return tuple(host_copy(v) for v in obj)
    return obj


def host_copy_all(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Host copies of many tensors in one allocation and one copy (views into it, same shapes
    and dtypes per group of equal dtype): a rank's ~1500 partitions cost one memcpy, not 1500."""
    out: list[torch.Tensor | None] = [None] * len(tensors)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(i)
    for idx in by_dtype.values():
        flat = torch.cat([tensors[i].detach().reshape(-1) for i in idx]).to("cpu", copy=True)
        offset = 0
        for i in idx:
            n = tensors[i].numel()
            out[i] = flat[offset: offset + n].view(tensors[i].shape)
            offset += n
    return out  # type: ignore[return-value]


class SnapshotEngine(TorchCheckpointEngine):
    """A DeepSpeed checkpoint engine whose saves are deferred (see the module docstring);
    loading is DeepSpeed's own."""

    def __init__(self) -> None:
        super().__init__(None)
        self.name = "TripSnapshotEngine"
        self.pending: list[tuple[str, Any]] = []

    def save(self, state_dict: Any, path: str) -> None:
        self.pending.append((path, host_copy(state_dict)))

    def preserves_storage_sharing(self) -> bool:
        return False  # each tensor is copied on its own: views do not keep their base alive

    def take(self) -> list[tuple[str, Any]]:
        """The saves since the last call, (path, host copy of the state)."""
        out, self.pending = self.pending, []
        return out


def write_snapshots(items: list[tuple[str, Any]]) -> None:
    """torch.save each deferred state to its path (temp name, then rename)."""
    for path, state in items:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.partial"
        torch.save(state, tmp)
        os.replace(tmp, path)
