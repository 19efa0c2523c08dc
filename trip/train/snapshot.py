"""Take a checkpoint's state off the training path: copy it to host memory, serialize later.

DeepSpeed writes its ZeRO files through a pluggable checkpoint engine whose `save(state,
path)` normally runs `torch.save` at once, so the training step waits for serialization
and the disk. `SnapshotEngine.save` only copies the state's tensors to host memory (a
memcpy of this rank's share: 1/W of the model and its Adam state) and remembers the path;
`write_snapshots` does the `torch.save`s afterwards, on the checkpoint writer's thread,
while training goes on. The copies are needed because the next optimizer step updates the
live tensors in place.

`ZeroSnapshot` goes one step further: DeepSpeed's `save_checkpoint` also recomputes, on
every save, what cannot change while an engine lives (parameter shapes, buffer names,
shared and frozen parameters: walks over every module, ~30-70 ms for the tiny model's ~500
tensors and more for the paper model's), releases every parameter and runs barriers. It
runs that bookkeeping once, when the trainer starts, keeps the constant part of each file
and on every checkpoint refreshes only what training changes (the optimizer state, the
step counters, persistent parameters and buffers). The files are the ones DeepSpeed writes,
key for key and value for value (`tests/unit/test_train_snapshot.py` compares the two), so
DeepSpeed's `load_checkpoint` and the universal conversion read them as they are.
"""

from __future__ import annotations

import os
import shutil
import tempfile
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


# what training changes in DeepSpeed's model-states file (`engine._common_checkpoint_state`);
# everything else in it is fixed for the life of the engine
_MODEL_DYNAMIC = ("module", "optimizer", "lr_scheduler", "skipped_steps", "global_steps", "global_samples")
# features whose state the fast path does not refresh: an engine using one saves the slow way
_MODEL_UNSUPPORTED = ("data_sampler", "random_ltd")


class _Recorder(TorchCheckpointEngine):
    """Keeps what DeepSpeed would save, as references (no copy, nothing written)."""

    def __init__(self) -> None:
        super().__init__(None)
        self.saved: list[tuple[str, Any]] = []

    def save(self, state_dict: Any, path: str) -> None:
        self.saved.append((path, state_dict))


class ZeroSnapshot:
    """This rank's DeepSpeed checkpoint files as host copies, without DeepSpeed's per-save
    bookkeeping (see the module docstring). Build it on every rank at the same point (the
    constructor runs one collective `save_checkpoint`); `capture` is local to the rank."""

    def __init__(self, engine: Any, scratch: str, tag: str, exclude_frozen: bool = False) -> None:
        """`exclude_frozen`: leave frozen parameters out of the files (DeepSpeed's
        `exclude_frozen_parameters`; a LoRA run's base is not checkpointed)."""
        self.engine, self.tag, self.exclude_frozen = engine, tag, exclude_frozen
        self.snapshots = SnapshotEngine()
        recorder = _Recorder()
        engine.checkpoint_engine = recorder
        root = tempfile.mkdtemp(prefix="ds-template-", dir=scratch)
        try:
            engine.save_checkpoint(root, tag=tag, client_state={}, exclude_frozen_parameters=exclude_frozen)
        finally:
            engine.checkpoint_engine = self.snapshots
            shutil.rmtree(root, ignore_errors=True)
        tag_dir = os.path.join(root, tag)
        self.model: list[tuple[str, dict[str, Any], dict[str, torch.Tensor]]] = []
        self.zero: list[tuple[str, dict[str, Any]]] = []
        self.fast = True
        for path, state in recorder.saved:
            rel = os.path.relpath(path, tag_dir)
            if isinstance(state, dict) and set(state) >= {"module", "global_steps"} and not any(
                    state.get(k) is not None for k in _MODEL_UNSUPPORTED):
                # the constant entries, plus a placeholder per dynamic one to keep the key order
                const = {k: None if k in _MODEL_DYNAMIC else host_copy(v) for k, v in state.items()}
                const["optimizer"] = state.get("optimizer") is not None
                # partitioned ZeRO-3 parameters are empty placeholders in `module` (the
                # save releases them first): those stay as they are; persistent parameters
                # and buffers hold values and are re-read at every capture
                live = {**dict(engine.module.named_parameters()), **dict(engine.module.named_buffers())}
                module = OrderedDict((k, host_copy(v)) for k, v in state["module"].items())
                refresh = {k: live[k] for k, v in module.items()
                           if isinstance(v, torch.Tensor) and v.numel() > 0 and k in live}
                if len(refresh) < sum(isinstance(v, torch.Tensor) and v.numel() > 0 for v in module.values()):
                    self.fast = False  # a value we could not trace to a live tensor
                const["module"] = module
                self.model.append((rel, const, refresh))
            elif isinstance(state, dict) and set(state) == {"optimizer_state_dict", "ds_config", "ds_version"}:
                self.zero.append((rel, {k: v for k, v in state.items() if k != "optimizer_state_dict"}))
            else:
                self.fast = False  # a file layout this class does not know: save the slow way

    def capture(self, ds_root: str, client_state: dict[str, Any]) -> list[tuple[str, Any]]:
        """(path under `ds_root`, host copy of the state) for each of this rank's DeepSpeed
        files, as `engine.save_checkpoint(ds_root, tag, client_state)` would save them."""
        e = self.engine
        if not self.fast:
            e.save_checkpoint(ds_root, tag=self.tag, client_state=client_state,
                              exclude_frozen_parameters=self.exclude_frozen)
            return self.snapshots.take()
        tag_dir = os.path.join(ds_root, self.tag)
        out = []
        for rel, const, refresh in self.model:
            module = OrderedDict(const["module"])
            module.update((k, host_copy(t.detach())) for k, t in refresh.items())
            fresh = {"module": module, "skipped_steps": e.skipped_steps, "global_steps": e.global_steps,
                     "global_samples": e.global_samples,
                     # below ZeRO the optimizer state lives in this file (there is no zero file)
                     "optimizer": host_copy(e.optimizer.state_dict()) if const["optimizer"] else None,
                     "lr_scheduler": host_copy(e.lr_scheduler.state_dict()) if e.lr_scheduler is not None else None}
            state = {k: fresh.get(k, v) for k, v in const.items()}  # DeepSpeed's key order
            state.update(client_state)
            out.append((os.path.join(tag_dir, rel), state))
        for rel, const in self.zero:
            out.append((os.path.join(tag_dir, rel), {"optimizer_state_dict": host_copy(e.optimizer.state_dict()),
                                                      **const}))
        return out
