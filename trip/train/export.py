"""`trip export`: a training checkpoint -> a TRIP model directory that `trip sample` loads.

Reads only our own files (JSON + safetensors: the gathered weights or their EMA), never
DeepSpeed's pickled optimizer state, and refuses a checkpoint whose file list is
incomplete. Given a run directory instead of one checkpoint, takes its newest complete one.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from trip import storage
from trip.train import checkpoint as ckpt


def _listing(url: str) -> list[str]:
    fs, root = storage.filesystem(url)
    root = root.rstrip("/")
    return [p[len(root) + 1:] for p in fs.find(root)]


def _meta(url: str) -> dict[str, Any] | None:
    meta_url = storage.join(url, ckpt.META_NAME)
    if not storage.exists(meta_url):
        return None
    meta = json.loads(storage.read_bytes(meta_url))
    return None if ckpt.missing_files(meta, _listing(url)) else meta


def resolve(checkpoint: str) -> tuple[str, dict[str, Any]]:
    """(checkpoint URL, meta): the checkpoint itself, or a run dir's newest complete one."""
    if storage.exists(storage.join(checkpoint, ckpt.META_NAME)):
        meta = _meta(checkpoint)
        if meta is None:
            raise ValueError(f"{checkpoint}: incomplete checkpoint (files missing; the save was interrupted)")
        return checkpoint, meta
    fs, root = storage.filesystem(checkpoint)
    if not fs.isdir(root):
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    best: tuple[int, str, dict[str, Any]] | None = None
    for sub in fs.ls(root, detail=False):
        name = sub.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("checkpoint_"):
            url = storage.join(checkpoint, name)
            meta = _meta(url)
            if meta is not None and (best is None or meta["step"] > best[0]):
                best = (meta["step"], url, meta)
    if best is None:
        raise FileNotFoundError(f"{checkpoint}: no complete checkpoint ({ckpt.META_NAME} + all files) in it")
    return best[1], best[2]


def export_checkpoint(checkpoint: str, out: str, use_ema: bool = True) -> str:
    """Write `out` (config.json + model.safetensors); returns the checkpoint URL used."""
    from safetensors.torch import load

    from trip.config import config_from_dict, to_dict
    from trip.model import TRIPModel

    url, meta = resolve(checkpoint)
    cfg = config_from_dict(meta["config"], storage.join(url, ckpt.META_NAME))
    name = "ema.safetensors" if use_ema and storage.exists(storage.join(url, "ema.safetensors")) \
        else "weights.safetensors"
    state = load(storage.read_bytes(storage.join(url, name)))
    model = TRIPModel(cfg.model, cfg.diffusion)
    model.load_state_dict(state, strict=True)  # names and shapes checked before anything is written
    model.save_pretrained(out, state_dict=state, extra={"codec": to_dict(cfg.codec), "sample": to_dict(cfg.sample)})
    print(f"[trip] exported {name} of step {meta['step']} from {url} -> {out}")
    return url


def cli(args: argparse.Namespace) -> int:
    try:
        export_checkpoint(args.checkpoint, args.out, use_ema=not args.no_ema)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
