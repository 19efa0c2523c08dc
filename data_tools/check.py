"""Looking at a latent dataset: validate it against index.json, print a shard, make a GIF.

`validate_dataset` is what an operator runs before pointing a training job at a prefix:
every shard listed in index.json is read in full and checked against the contract (keys,
shapes, dtypes, counts, byte sizes); every problem is returned with the shard and key it
concerns, rather than stopping at the first.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from data_tools.shards import INDEX_NAME, read_index, read_shard
from trip import storage


def _check_sample(sample: dict[str, Any], index: dict[str, Any], where: str) -> list[str]:
    problems = []
    for field_name in ("latents", "json", "txt"):
        if field_name not in sample:
            problems.append(f"{where}: missing .{field_name}")
    lat = sample.get("latents")
    if lat is not None:
        if list(lat.shape) != list(index["latent_shape"]):
            problems.append(f"{where}: latents shape {list(lat.shape)} != index {index['latent_shape']}")
        if str(lat.dtype) != index.get("latent_dtype", "float16"):
            problems.append(f"{where}: latents dtype {lat.dtype} != {index.get('latent_dtype')}")
        if not np.isfinite(lat).all():
            problems.append(f"{where}: latents hold NaN or inf")
    text_shape = index.get("text_shape")
    if text_shape and "text" not in sample:
        problems.append(f"{where}: missing .text.npy (index has text_shape {text_shape})")
    if "text" in sample and list(sample["text"].shape) != list(text_shape or []):
        problems.append(f"{where}: text shape {list(sample['text'].shape)} != index {text_shape}")
    return problems


def _check_shard(prefix: str, entry: dict[str, Any], index: dict[str, Any],
                 seen: set[str]) -> tuple[int, list[str]]:
    url = storage.join(prefix, entry["name"])
    try:
        fs, path = storage.filesystem(url)
        size = fs.size(path)
        samples = read_shard(url)
    except FileNotFoundError:
        return 0, [f"{entry['name']}: listed in {INDEX_NAME} but missing"]
    except ValueError as e:
        return 0, [str(e)]
    problems = []
    if size != entry.get("bytes", size):
        problems.append(f"{entry['name']}: {size} bytes, {INDEX_NAME} says {entry['bytes']}")
    if len(samples) != entry["samples"]:
        problems.append(f"{entry['name']}: {len(samples)} samples, {INDEX_NAME} says {entry['samples']}")
    for s in samples:
        where = f"{entry['name']}:{s['__key__']}"
        if s["__key__"] in seen:
            problems.append(f"{where}: duplicate key")
        seen.add(s["__key__"])
        problems += _check_sample(s, index, where)
    return len(samples), problems


def validate_dataset(prefix: str) -> tuple[dict[str, Any], list[str]]:
    """(index, problems) for the dataset at `prefix`; no problems means it is sound."""
    index = read_index(prefix)
    problems: list[str] = []
    seen: set[str] = set()
    total = 0
    for entry in index["shards"]:
        n, p = _check_shard(prefix, entry, index, seen)
        total += n
        problems += p
    if total != index["num_samples"]:
        problems.append(f"{total} samples in shards, {INDEX_NAME} says num_samples={index['num_samples']}")
    fs, root = storage.filesystem(prefix)
    fs.invalidate_cache(root)
    listed = {e["name"] for e in index["shards"]}
    for path in fs.ls(root, detail=False):
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if name.endswith(".tar") and name not in listed:
            problems.append(f"{name}: in {prefix} but not listed in {INDEX_NAME}")
    return index, problems


def shard_url(prefix: str, index: dict[str, Any], shard: str | int | None) -> str:
    """URL of a shard given by name, position in index.json, or None (the first)."""
    names = [e["name"] for e in index["shards"]]
    if not names:
        raise ValueError(f"{prefix}: the dataset has no shards")
    if shard is None:
        return storage.join(prefix, names[0])
    if isinstance(shard, int) or str(shard).isdigit():
        i = int(shard)
        if not 0 <= i < len(names):
            raise ValueError(f"{prefix}: shard position {i} out of range (0..{len(names) - 1})")
        return storage.join(prefix, names[i])
    if shard not in names:
        raise ValueError(f"{prefix}: no shard named {shard!r} in {INDEX_NAME}")
    return storage.join(prefix, str(shard))


def describe_sample(sample: dict[str, Any]) -> str:
    """One line per sample: key, video id, caption, latent/text shapes and ranges."""
    lat = sample["latents"]
    meta = sample.get("json", {})
    text = sample.get("text")
    text_desc = f" text {list(text.shape)} {text.dtype}" if text is not None else ""
    return (f"{sample['__key__']}  video {meta.get('videoid', '?')}  latents {list(lat.shape)} "
            f"{lat.dtype} [{float(lat.min()):.3f}, {float(lat.max()):.3f}]{text_desc}  "
            f"{sample.get('txt', '')!r}")


def build_codec_from_index(index: dict[str, Any], codec_path: str | None = None):
    """The codec that wrote the dataset, from index.json's identity (path overridable)."""
    from trip.codec import LosslessCodec, VAECodec

    ident = index.get("codec") or {}
    if ident.get("kind") == "lossless":
        return LosslessCodec(int(ident["downscale"]))
    if ident.get("kind") == "vae":
        return VAECodec(codec_path or ident["source"])
    raise ValueError(f"index.json has an unknown codec identity: {ident}")


def sample_to_gif(sample: dict[str, Any], codec, path: str, fps: int = 4, scale: int = 4) -> str:
    """Decode a sample's latents [F, C, h, w] through `codec` and write a looping GIF."""
    import torch

    from trip.video import write_gif

    frames = codec.decode(torch.from_numpy(sample["latents"].astype(np.float32)))
    return write_gif(frames, path, fps=fps, scale=scale)
