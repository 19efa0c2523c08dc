"""Looking at a latent dataset: validate it against index.json, print a shard, make a GIF.

`validate_dataset` is what an operator runs before pointing a training job at a prefix:
every shard listed in index.json is read in full and checked against the contract (keys,
shapes, dtypes, finite values, counts, byte sizes); every problem is returned with the
shard and key it concerns, rather than stopping at the first. Shards are read and samples
judged by the training loader's own reader and check (`trip.data.shards.read_samples`,
`decode_sample`), so validate and training agree on which samples are bad: a sample the
tar walk could not reach is named `#<ordinal>`, as the loader names it. (With
`data.text: false` the loader does not require text states; validate always does when
index.json has a text_shape.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from trip import storage
from trip.data.shards import (
    INDEX_NAME,
    Sample,
    dataset_buckets,
    read_index,
    read_shard,
    shard_latent_shapes,
)


@dataclass
class ShardCheck:
    """What validate found in one shard listed in index.json."""

    name: str
    samples: int = 0  # samples the tar walk reached
    bad: dict[str, str] = field(default_factory=dict)  # key (or #ordinal) -> why
    problems: list[str] = field(default_factory=list)  # about the shard as a whole


def check_shard(prefix: str, entry: dict[str, Any], index: dict[str, Any], seen: set[str],
                latent_shape: Sequence[int] | None = None) -> ShardCheck:
    """Read one shard of index.json's `entry` and judge every sample as the loader does;
    `seen` collects keys across shards to find duplicates. `latent_shape`: the shard's own
    (its bucket's, `shard_latent_shapes`); default the index's top-level one."""
    name = entry["name"]
    url = storage.join(prefix, name)
    check = ShardCheck(name)
    try:
        fs, path = storage.filesystem(url)
        size = fs.size(path)
        contents = read_shard(url, latent_shape=latent_shape or index["latent_shape"],
                              text_shape=index.get("text_shape"))
    except FileNotFoundError:
        check.problems.append(f"{name}: listed in {INDEX_NAME} but missing")
        return check
    check.samples = len(contents.keys)
    if size != entry.get("bytes", size):
        check.problems.append(f"{name}: {size} bytes, {INDEX_NAME} says {entry['bytes']}")
    if contents.error:
        check.problems.append(f"{name}: {contents.error}")
    if check.samples != entry["samples"]:
        check.problems.append(f"{name}: {check.samples} samples, {INDEX_NAME} says {entry['samples']}")
    check.bad.update(contents.bad)
    for key in contents.keys:
        if key in seen:
            check.bad[key] = "; ".join(filter(None, [check.bad.get(key), "duplicate key"]))
        seen.add(key)
    for ordinal in range(check.samples, entry["samples"]):  # what the loader would find missing
        check.bad[f"#{ordinal}"] = contents.error or "sample missing from shard"
    return check


def _bad_lines(check: ShardCheck) -> list[str]:
    """One line per bad sample; the unreachable tail of a cut shard as one line."""
    lines = [f"{check.name}:{key}: {why}" for key, why in check.bad.items() if not key.startswith("#")]
    missing = [key for key in check.bad if key.startswith("#")]
    if missing:
        lines.append(f"{check.name}: samples {missing[0]}..{missing[-1]} unreadable")
    return lines


def validate_dataset(prefix: str) -> tuple[dict[str, Any], list[str]]:
    """(index, problems) for the dataset at `prefix`; no problems means it is sound. A
    bucketed dataset's shards are each judged against their bucket's latent shape, and
    its bucket folders are listed too."""
    index = read_index(prefix)
    problems: list[str] = []
    try:
        shapes: list[tuple[int, ...] | None] = list(shard_latent_shapes(index))
        folders = [b.name for b in dataset_buckets(index)] if index.get("buckets") else []
    except ValueError as e:  # the bucket list and the shard list disagree
        problems.append(str(e))
        shapes, folders = [None] * len(index["shards"]), []
    seen: set[str] = set()
    total = 0
    for entry, shape in zip(index["shards"], shapes, strict=True):
        check = check_shard(prefix, entry, index, seen, shape)
        total += check.samples
        problems += check.problems + _bad_lines(check)
    if total != index["num_samples"]:
        problems.append(f"{total} samples in shards, {INDEX_NAME} says num_samples={index['num_samples']}")
    fs, root = storage.filesystem(prefix)
    fs.invalidate_cache(root)
    listed = {e["name"] for e in index["shards"]}
    for folder in ["", *folders]:
        try:
            paths = fs.ls(f"{root.rstrip('/')}/{folder}" if folder else root, detail=False)
        except FileNotFoundError:  # a bucket no clip went to has no folder
            continue
        for path in paths:
            name = "/".join(filter(None, [folder, path.rstrip("/").rsplit("/", 1)[-1]]))
            if name.endswith(".tar") and name not in listed:
                problems.append(f"{name}: in {prefix} but not listed in {INDEX_NAME}")
    return index, problems


def bucket_lines(index: dict[str, Any]) -> list[str]:
    """One line per bucket of a bucketed dataset (name, pixel size, frames, latent shape,
    samples, shards); none for a dataset of one shape."""
    if not index.get("buckets"):
        return []
    return [f"bucket {b.name}: " + (f"{b.height}x{b.width} px, {b.frames} frames, " if b.height else "")
            + f"latents {list(b.latent_shape)}, {b.samples} samples in {len(b.shards)} shards"
            for b in dataset_buckets(index)]


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


def describe_sample(sample: Sample) -> str:
    """One line per sample: key, video id, caption, latent/text shapes and ranges."""
    lat, text = sample.latents, sample.text
    text_desc = f" text {list(text.shape)} {text.dtype}" if text is not None else ""
    return (f"{sample.key}  video {sample.meta.get('videoid', '?')}  latents {list(lat.shape)} "
            f"{lat.dtype} [{float(lat.min()):.3f}, {float(lat.max()):.3f}]{text_desc}  "
            f"{sample.caption!r}")


def build_codec_from_index(index: dict[str, Any], codec_path: str | None = None):
    """The codec that wrote the dataset, from index.json's identity (path overridable)."""
    from trip.codec import LosslessCodec, VAECodec

    ident = index.get("codec") or {}
    if ident.get("kind") == "lossless":
        return LosslessCodec(int(ident["downscale"]))
    if ident.get("kind") == "vae":
        return VAECodec(codec_path or ident["source"])
    raise ValueError(f"index.json has an unknown codec identity: {ident}")


def sample_to_gif(sample: Sample, codec, path: str, fps: int = 4, scale: int = 4) -> str:
    """Decode a sample's latents [F, C, h, w] through `codec` and write a looping GIF."""
    import torch

    from trip.video import write_gif

    frames = codec.decode(torch.from_numpy(sample.latents.astype(np.float32)))
    return write_gif(frames, path, fps=fps, scale=scale)
