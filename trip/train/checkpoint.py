"""Checkpoint layout, completeness check and the choice of a checkpoint to resume from.

A training checkpoint is one Ray Train checkpoint directory holding what every rank wrote:
DeepSpeed's ZeRO files under `DS_TAG/`, `rng/rank<r>.json` (per-rank RNG states), and from
rank 0 `weights.safetensors`, `ema.safetensors` and `META_NAME` (step, merged loader state,
world size, config hash, loss history, and the list of files every rank must have written).
A save torn by a crash (a rank's upload missing) fails `missing_files`, and resume falls back
to the previous checkpoint instead of loading a broken one.

Our own files are JSON and safetensors: nothing of ours is unpickled from storage.
"""

from __future__ import annotations

import fnmatch
import json
import os
import random
import subprocess
import sys
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import torch

DS_TAG = "ds"
FORMAT = "trip-checkpoint/1"
META_NAME = "trip_checkpoint.json"


def write_json(path: str, obj: Any) -> None:
    """Write JSON atomically (rename), creating parent dirs."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh)
    os.replace(tmp, path)


def expected_files(world_size: int, ema: bool, stage: int = 3) -> list[str]:
    """Glob patterns (relative, '/'-separated) a complete checkpoint must match.

    ZeRO-3 writes model and optimizer states per rank; stages 1-2 one model file (rank 0)
    plus per-rank optimizer partitions; stage 0 everything in one file.
    """
    out = ["weights.safetensors", META_NAME, f"{DS_TAG}/*model_states.pt"]
    if ema:
        out.append("ema.safetensors")
    for r in range(world_size):
        out.append(f"rng/rank{r}.json")
        if stage >= 1:
            out.append(f"{DS_TAG}/*zero_pp_rank_{r}_*optim_states.pt")
        if stage == 3:
            out.append(f"{DS_TAG}/*zero_pp_rank_{r}_*model_states.pt")
    return out


def missing_files(meta: dict[str, Any], present: list[str]) -> list[str]:
    """Patterns of `meta["files"]` that no present relative path matches."""
    return [pat for pat in meta.get("files", []) if not fnmatch.filter(present, pat)]


def _local_listing(root: str) -> list[str]:
    out = []
    for dirpath, _, files in os.walk(root):
        for f in files:
            out.append(os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/"))
    return out


def read_meta(local_dir: str) -> dict[str, Any] | None:
    """The checkpoint's meta if the directory is complete, else None."""
    path = os.path.join(local_dir, META_NAME)
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        meta = json.load(fh)
    if meta.get("format") != FORMAT or missing_files(meta, _local_listing(local_dir)):
        return None
    return meta


def _remote_meta(checkpoint: Any) -> tuple[dict[str, Any] | None, str]:
    """(meta, reason) of a checkpoint in storage, meta None when incomplete."""
    import pyarrow.fs as pafs

    fs, root = checkpoint.filesystem, checkpoint.path.rstrip("/")
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    except (OSError, FileNotFoundError) as e:
        return None, f"cannot list ({e})"
    present = [str(PurePosixPath(i.path).relative_to(root)) for i in infos if i.type == pafs.FileType.File]
    if META_NAME not in present:
        return None, f"no {META_NAME}"
    with fs.open_input_stream(f"{root}/{META_NAME}") as fh:
        meta = json.loads(fh.read())
    missing = missing_files(meta, present)
    if missing:
        return None, f"missing {missing[:3]}"
    return meta, "ok"


def run_storage(storage_path: str) -> tuple[str, Any]:
    """(path, pyarrow filesystem or None) of a run's storage, as Ray's RunConfig wants them:
    with a filesystem object the path is 'bucket/key', never 's3://bucket/key'."""
    from trip import storage

    if not storage.is_url(storage_path):
        return os.path.abspath(storage_path), None
    import pyarrow.fs as pafs

    fs, path = storage.filesystem(storage_path)
    return path, pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def scan_run(storage_path: str, name: str) -> Any:
    """The newest complete checkpoint found by listing the run directory, or None.

    Used when Ray hands a worker group no checkpoint although the run has some (seen after
    a controller-level restart during an elastic shrink): never restart from scratch then.
    """
    import pyarrow.fs as pafs
    from ray.train import Checkpoint

    path, fs = run_storage(storage_path)
    fs = fs or pafs.LocalFileSystem()
    root = f"{path.rstrip('/')}/{name}"
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except OSError:
        return None
    dirs = [i.path for i in infos if i.type == pafs.FileType.Directory
            and PurePosixPath(i.path).name.startswith("checkpoint_")]
    if not dirs:
        return None
    return find_resume_checkpoint(Checkpoint(path=max(dirs), filesystem=fs))


def find_resume_checkpoint(latest: Any) -> Any:
    """The newest complete checkpoint of the run: Ray's latest, else its older siblings.

    Ray registers a checkpoint only after every rank reported, but a crash can still tear
    an upload; our file list is the final word.
    """
    if latest is None:
        return None
    import pyarrow.fs as pafs
    from ray.train import Checkpoint

    meta, why = _remote_meta(latest)
    if meta is not None:
        return latest
    print(f"[trip] latest checkpoint {latest.path} is incomplete ({why}); looking for an older one", flush=True)
    fs, parent = latest.filesystem, str(PurePosixPath(latest.path.rstrip("/")).parent)
    infos = fs.get_file_info(pafs.FileSelector(parent))
    dirs = sorted((i.path for i in infos if i.type == pafs.FileType.Directory
                   and PurePosixPath(i.path).name.startswith("checkpoint_")), reverse=True)
    best = None
    for d in dirs:
        cand = Checkpoint(path=d, filesystem=fs)
        m, _ = _remote_meta(cand)
        if m is not None and (best is None or m["step"] > best[0]):
            best = (m["step"], cand)
    if best is None:
        print("[trip] no complete checkpoint found: starting from scratch", flush=True)
        return None
    print(f"[trip] resuming from {best[1].path} (step {best[0]})", flush=True)
    return best[1]


def to_universal(local_dir: str, root: str) -> str:
    """DeepSpeed ZeRO checkpoint -> universal checkpoint in `root/universal` (any world size)."""
    out = os.path.join(root, "universal")
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
           "--input_folder", os.path.join(local_dir, DS_TAG), "--output_folder", out,
           "--num_extract_workers", "1", "--num_merge_workers", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ds_to_universal failed on {local_dir}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return out


def rng_state() -> dict[str, Any]:
    """torch/numpy/python RNG states as JSON (DeepSpeed saves none of them)."""
    np_state = np.random.get_state()
    py = random.getstate()
    return {
        "torch": torch.get_rng_state().tolist(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py[0], list(py[1]), py[2]],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
