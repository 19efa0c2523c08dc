"""`trip export`: a training checkpoint -> a TRIP model directory that `trip sample` loads.

A checkpoint holds the weights and their EMA as per-rank partitions (one safetensors file
per rank, see `trip.train.partitions`). Export consolidates them offline, tensor by tensor,
so its peak memory is about one tensor, not the model: a 1.4B-parameter model exports on a
machine that could not hold it twice. Only our own files are read (JSON + safetensors),
never DeepSpeed's pickled optimizer state, and an incomplete checkpoint is refused. Given a
run directory instead of one checkpoint, export takes its newest complete one.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Any

from trip import storage
from trip.log import get_logger
from trip.train import checkpoint as ckpt

log = get_logger(__name__)


def resolve(url: str) -> ckpt.Found:
    """The checkpoint at `url`, or the newest complete checkpoint of the run directory `url`."""
    run, step = ckpt.RunDir.of_checkpoint(url)
    if step is not None:
        rec, why = run.check(step)
        if rec is None:
            raise ValueError(f"{url}: incomplete checkpoint ({why}; the save was interrupted)")
        return ckpt.Found(step, run.checkpoint_url(step), rec)
    if not run.steps():
        raise FileNotFoundError(f"checkpoint not found: {url} (neither a checkpoint nor a run directory with "
                                f"checkpoints/step-*)")
    found = run.latest()
    if found is None:
        raise FileNotFoundError(f"{url}: no complete checkpoint ({ckpt.RECORD} and all its files) in it")
    return found


def export_checkpoint(checkpoint: str, out: str, use_ema: bool = True) -> str:
    """Write `out` (config.json + model.safetensors); returns the checkpoint URL used."""
    import torch

    from trip.config import config_from_dict, to_dict
    from trip.model import TRIPModel
    from trip.model.trip import WEIGHTS_NAME
    from trip.train import partitions

    found = resolve(checkpoint)
    rec = found.record
    cfg = config_from_dict(rec["config"], storage.join(found.url, ckpt.RECORD))
    world = int(rec["world_size"])
    kind = "ema" if use_ema and ckpt.partition_file("ema", 0, world) in rec["files"] else "weights"
    rels = [ckpt.partition_file(kind, r, world) for r in range(world)]
    run, _ = ckpt.RunDir.of_checkpoint(found.url)
    with tempfile.TemporaryDirectory(prefix="trip-export-") as tmp:
        run.download(found.step, rels, tmp)
        files = [os.path.join(tmp, rel) for rel in rels]
        with torch.device("meta"):  # names and shapes only: nothing allocated
            model = TRIPModel(cfg.model, cfg.diffusion)
        rank0 = partitions.read_partition_file(files[0])  # rank 0's file lists every tensor
        _check_names({n: t.shape for n, t in rank0.tensors.items()}, model, found.url)
        with storage.local_dir_for_upload(out) as local:
            target = os.path.join(local, f".{WEIGHTS_NAME}.tmp")
            partitions.consolidate(files, target, dtype=torch.float32, kind=kind)
            os.replace(target, os.path.join(local, WEIGHTS_NAME))
            model.write_config(local, extra={"codec": to_dict(cfg.codec), "sample": to_dict(cfg.sample)})
    log.info(f"exported {kind} of step {found.step} from {found.url} -> {out}")
    return found.url


def _check_names(shapes: dict[str, Any], model: Any, where: str) -> None:
    """The checkpoint's tensors are exactly the model's parameters, shape for shape."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v) for k, v in shapes.items()}
    missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    bad = sorted(k for k in set(want) & set(got) if want[k] != got[k])
    if missing or unexpected or bad:
        raise ValueError(f"{where}: checkpoint tensors do not match the model: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}, other shape {bad[:3]}")


def cli(args: argparse.Namespace) -> int:
    try:
        export_checkpoint(args.checkpoint, args.out, use_ema=not args.no_ema)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
