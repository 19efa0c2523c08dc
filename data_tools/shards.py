"""The shard contract: writing latent WebDataset tars and the dataset's index.json.

One sample per clip, keys inside the tar:
    <key>.latents.npy  float16 [F, C, h, w]  (already multiplied by the codec's scaling factor)
    <key>.text.npy     float16 [L, D]        (optional)
    <key>.json         {videoid, caption, fps, frame_stride, source_url, src_size, ...}
    <key>.txt          the caption

A shard is built in a local temporary file and only then committed to its final name
(rename on local disk; a single PUT on object storage, where an object appears whole or
not at all), so a reader never sees a partial shard. `index.json` is written last, the
same way, and is what loaders trust.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from trip import storage

SCHEMA_VERSION = 1
INDEX_NAME = "index.json"


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


@dataclass
class ShardInfo:
    """What index.json records of one committed shard."""

    name: str
    samples: int
    bytes: int
    # per-channel running sums of the latents, to combine into dataset mean/std
    channel_sum: list[float] = field(default_factory=list)
    channel_sumsq: list[float] = field(default_factory=list)
    channel_count: int = 0


class ShardWriter:
    """Write one shard: `add(...)` samples, then `commit()` (or `abort()`)."""

    def __init__(self, prefix: str, index: int) -> None:
        self.prefix = prefix
        self.name = shard_name(index)
        self.url = storage.join(prefix, self.name)
        fd, self._tmp = tempfile.mkstemp(prefix=".partial-", suffix=".tar")
        os.close(fd)
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        self.samples = 0
        self._sum: np.ndarray | None = None
        self._sumsq: np.ndarray | None = None
        self._count = 0
        self._mtime = time.time()

    def _add_member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0  # reproducible bytes: a rerun writes the very same shard
        info.mode = 0o644
        self._tar.addfile(info, io.BytesIO(data))

    def add(self, key: str, latents: np.ndarray, meta: dict[str, Any], caption: str,
            text: np.ndarray | None = None) -> None:
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
        if latents.ndim != 4:
            raise ValueError(f"latents for {key} must be [F, C, h, w], got shape {latents.shape}")
        lat = latents.astype(np.float16)
        self._add_member(f"{key}.latents.npy", npy_bytes(lat))
        if text is not None:
            if text.ndim != 2:
                raise ValueError(f"text states for {key} must be [L, D], got shape {text.shape}")
            self._add_member(f"{key}.text.npy", npy_bytes(text.astype(np.float16)))
        self._add_member(f"{key}.json", json.dumps(meta, sort_keys=True).encode())
        self._add_member(f"{key}.txt", caption.encode())
        x = lat.astype(np.float64)
        s = x.sum(axis=(0, 2, 3))
        sq = (x * x).sum(axis=(0, 2, 3))
        self._sum = s if self._sum is None else self._sum + s
        self._sumsq = sq if self._sumsq is None else self._sumsq + sq
        self._count += x.shape[0] * x.shape[2] * x.shape[3]
        self.samples += 1

    def commit(self) -> ShardInfo:
        """Close the tar and make it visible under its final name."""
        self._tar.close()
        try:
            size = os.path.getsize(self._tmp)
            dest = storage.local_path(self.url)
            if dest is None:
                fs, path = storage.filesystem(self.url)
                storage.retry(lambda: fs.put_file(self._tmp, path), what=f"upload of {self.url}")
            else:
                os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
                tmp_dest = os.path.join(os.path.dirname(os.path.abspath(dest)), f".{self.name}.tmp")
                with open(self._tmp, "rb") as src, open(tmp_dest, "wb") as dst:
                    dst.write(src.read())
                os.replace(tmp_dest, dest)
        finally:
            os.unlink(self._tmp)
        return ShardInfo(
            name=self.name, samples=self.samples, bytes=size,
            channel_sum=[] if self._sum is None else self._sum.tolist(),
            channel_sumsq=[] if self._sumsq is None else self._sumsq.tolist(),
            channel_count=self._count,
        )

    def abort(self) -> None:
        try:
            self._tar.close()
        finally:
            if os.path.exists(self._tmp):
                os.unlink(self._tmp)


def build_index(shards: list[ShardInfo], *, latent_shape: list[int], text_shape: list[int] | None,
                codec: dict[str, Any], text_encoder: dict[str, Any] | None,
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The dataset's index.json content; mean/std are per latent channel over all samples."""
    shards = sorted(shards, key=lambda s: s.name)
    total = sum(s.samples for s in shards)
    count = sum(s.channel_count for s in shards)
    mean = std = None
    if count:
        ssum = np.sum([s.channel_sum for s in shards if s.channel_count], axis=0)
        ssq = np.sum([s.channel_sumsq for s in shards if s.channel_count], axis=0)
        m = ssum / count
        mean = m.tolist()
        std = np.sqrt(np.maximum(ssq / count - m * m, 0.0)).tolist()
    index = {
        "schema_version": SCHEMA_VERSION,
        "num_samples": total,
        "shards": [{"name": s.name, "samples": s.samples, "bytes": s.bytes} for s in shards],
        "latent_shape": list(latent_shape),
        "latent_dtype": "float16",
        "text_shape": list(text_shape) if text_shape else None,
        "text_dtype": "float16" if text_shape else None,
        "codec": codec,
        "scaling_factor": codec.get("scaling_factor"),
        "text_encoder": text_encoder,
        "latent_mean": mean,
        "latent_std": std,
        "shard_stats": [asdict(s) for s in shards],
    }
    if extra:
        index.update(extra)
    return index


def write_index(prefix: str, index: dict[str, Any]) -> str:
    url = storage.join(prefix, INDEX_NAME)
    storage.write_bytes_atomic(url, json.dumps(index, indent=2, sort_keys=True).encode())
    return url


def read_index(prefix: str) -> dict[str, Any]:
    """Read and sanity-check a dataset's index.json; errors name the file and field."""
    url = storage.join(prefix, INDEX_NAME)
    try:
        raw = storage.read_bytes(url)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"dataset index not found: {url}") from e
    try:
        index = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{url}: not valid JSON: {e}") from e
    for key in ("schema_version", "shards", "num_samples", "latent_shape"):
        if key not in index:
            raise ValueError(f"{url}: missing field '{key}'")
    if index["schema_version"] != SCHEMA_VERSION:
        raise ValueError(f"{url}: schema_version {index['schema_version']} is not supported "
                         f"(this code reads {SCHEMA_VERSION})")
    return index


# --------------------------------------------------------------------------- reading back


def _decode_member(name: str, data: bytes) -> Any:
    """Only .npy (no pickle), .json and .txt are ever decoded from a shard."""
    if name.endswith(".npy"):
        return np.load(io.BytesIO(data), allow_pickle=False)
    if name.endswith(".json"):
        return json.loads(data)
    if name.endswith(".txt"):
        return data.decode("utf-8")
    raise ValueError(f"unexpected member type {name!r}")


def read_shard(url: str) -> list[dict[str, Any]]:
    """All samples of one shard, in tar order: {"__key__", "latents", "text"?, "json", "txt"}.

    Raises ValueError naming the shard and member for anything outside the contract.
    """
    raw = storage.read_bytes(url)
    samples: dict[str, dict[str, Any]] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    raise ValueError(f"{url}: member {member.name!r} is not a regular file")
                key, _, ext = member.name.partition(".")
                field_name = {"latents.npy": "latents", "text.npy": "text", "json": "json",
                              "txt": "txt"}.get(ext)
                if field_name is None:
                    raise ValueError(f"{url}: member {member.name!r} is not part of the shard contract")
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                samples.setdefault(key, {"__key__": key})[field_name] = _decode_member(member.name, data)
    except tarfile.TarError as e:
        raise ValueError(f"{url}: not a readable tar: {e}") from e
    return list(samples.values())
