"""Per-rank ZeRO-3 partition files: write, reshard to another world size, consolidate.

Under ZeRO-3 every one of W ranks holds a flat slice of every parameter (`p.ds_tensor`,
with `p.ds_numel` and `p.ds_shape`). Instead of gathering full tensors onto every rank at
each checkpoint, each rank writes its own slices to its own safetensors file
(`write_partitions`); a resume at another world size builds each new rank's slices from
the few old files that overlap them (`source_ranks`, `read_local_partitions`); `trip
export` assembles full tensors offline, one at a time (`consolidate`).

Pure: no torch.distributed, no storage URLs. Callers pass local paths (and download only
the files `source_ranks` names).

The partition rule, verified in the installed DeepSpeed 0.19.8,
`deepspeed/runtime/zero/partition_parameters.py` (`Init._aligned_size` l. 1690,
`_padding_size` l. 1693-1696, `_partition_param` l. 1816-1817 and 1852-1876):

    padding        = (W - numel % W) if numel % W else 0
    partition size = s = (numel + padding) // W = ceil(numel / W)     (ds_tensor.ds_numel)
    rank r holds   flat[r * s : (r + 1) * s] of the flattened tensor padded at the end;
                   only flat[r*s : min((r+1)*s, numel)] is real: the rest (all of it on the
                   last ranks of a tensor smaller than W) is padding, left uninitialised
                   (`torch.empty`), so its contents mean nothing.

W and r are the size of and rank in the parameter's partition group, `p.ds_process_group`
(l. 1302, `_partition_world_size` / `_partition_rank` l. 1701-1705): the data-parallel
group, i.e. the whole world here. Every rank's `ds_tensor` has the same length s. Not
covered: groups smaller than the world (MiCS, `ds_zero_partition_process_group`), where
ranks of different groups hold copies of the same slice.

File format (version 1): a standard safetensors file, every tensor stored 1-D and holding
only its real elements (padding stripped, so a file's bytes are exactly its share; a slice
with no real element is not stored at all), in the dtype the caller gave. Its
`__metadata__` holds one key, `"trip_partitions"`, whose value is JSON:

    {"format": "trip-zero-partitions", "version": 1, "kind": "ema", "rank": 3, "world_size": 512,
     "tensors": [{"name": ..., "shape": [full shape], "numel": n, "partitioned": true,
                  "partition_size": s, "offset": flat offset of this slice, "length": real
                  elements stored, "dtype": "F32"}, ...]}

`tensors` lists the entries in the order given to `write_partitions`. A partitioned entry
is listed by every rank (offset = min(r*s, numel), length = min(s, numel - offset) clamped at
0); an unpartitioned one (a parameter ZeRO keeps whole, or ZeRO stage < 3) only by rank 0,
with offset 0, length numel and partition_size numel. So rank 0's file lists every tensor.

What a resize reads: a new rank's slice of a large tensor covers the same relative stretch
of every such tensor, so 2-3 old files hold it. Small and medium tensors do not follow: s =
ceil(numel / W) rounds differently per size, so the slice of a tensor drifts from that
stretch by about W_old * (W_old + W_new) / numel old ranks (a 320-element bias at 512 -> 448:
new rank r holds element r, in old file r, not ~1.14 r). With the paper model's 1535 tensors
(512 -> 448) a new rank needs ~17 old files (at most 22) of 512. Written whole by rank 0
instead (unpartitioned entries; e.g. DeepSpeed's persistent parameters, numel <= 1e5, whose
full data every rank holds anyway), those small tensors bring it to rank 0 + at most 3.

Tensor data in every file this module writes (partition files and consolidated ones) is
laid out in the listed order, grouped by element size, largest first (as safetensors' own
writer groups by dtype), so that each tensor starts aligned to its element size; the
header is JSON padded with spaces to a multiple of 8 bytes, like safetensors' writer.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

FORMAT = "trip-zero-partitions"
VERSION = 1
META_KEY = "trip_partitions"
CONSOLIDATED_META_KEY = "trip_consolidated"

_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
_FROM_ST = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header
_MAX_OPEN = 256  # partition files consolidate() keeps open at once


# ---------------------------------------------------------------- the partition rule


def partition_size(numel: int, world_size: int) -> int:
    """Length of every rank's `ds_tensor` of a parameter of `numel` elements: ceil(numel / W)."""
    _check_world(world_size)
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    return -(-numel // world_size)


def partition_range(numel: int, rank: int, world_size: int) -> tuple[int, int]:
    """The real elements [start, stop) of the flattened tensor that `rank` holds (maybe empty)."""
    _check_rank(rank, world_size)
    s = partition_size(numel, world_size)
    start = min(rank * s, numel)
    return start, min(start + s, numel)


class PartitionLayout(NamedTuple):
    """How one tensor of `numel` elements is split over `world_size` ranks."""

    numel: int
    world_size: int
    size: int  # every rank's partition length (padded): ceil(numel / world_size)

    def range(self, rank: int) -> tuple[int, int]:
        """Real elements [start, stop) held by `rank`."""
        return partition_range(self.numel, rank, self.world_size)

    def ranks(self, start: int, stop: int) -> range:
        """The ranks holding any real element of [start, stop)."""
        if stop <= start or self.size == 0:
            return range(0)
        return range(start // self.size, (stop - 1) // self.size + 1)


def partition_layout(numels: Iterable[int], world_size: int) -> list[PartitionLayout]:
    """One `PartitionLayout` per tensor, in order."""
    return [PartitionLayout(n, world_size, partition_size(n, world_size)) for n in numels]


def source_ranks(numels: Sequence[int], old_world: int, new_rank: int, new_world: int, *,
                 old_partitioned: Sequence[bool] | None = None,
                 new_partitioned: Sequence[bool] | None = None) -> list[int]:
    """The old ranks whose files `new_rank` (of `new_world`) needs, sorted.

    `numels[i]` is tensor i's element count; by default it is partitioned both in the old
    run (its data spread over the old ranks) and in the new one (`new_rank` wants only its
    slice). `old_partitioned[i] = False`: it was kept whole, so only in old rank 0's file.
    `new_partitioned[i] = False`: the new rank wants it whole (every old slice of it).
    """
    n = len(numels)
    old_p = [True] * n if old_partitioned is None else list(old_partitioned)
    new_p = [True] * n if new_partitioned is None else list(new_partitioned)
    if len(old_p) != n or len(new_p) != n:
        raise ValueError(f"numels has {n} entries but old_partitioned/new_partitioned have "
                         f"{len(old_p)}/{len(new_p)}")
    _check_rank(new_rank, new_world)
    _check_world(old_world)
    need: set[int] = set()
    for numel, op, np_ in set(zip(numels, old_p, new_p)):  # models repeat few sizes many times
        if numel < 0:
            raise ValueError(f"numel must be >= 0, got {numel}")
        if np_:
            s = -(-numel // new_world)
            start = min(new_rank * s, numel)
            stop = min(start + s, numel)
        else:
            start, stop = 0, numel
        if stop <= start:
            continue
        if not op:
            need.add(0)
            continue
        s_old = -(-numel // old_world)
        need.update(range(start // s_old, (stop - 1) // s_old + 1))
    return sorted(need)


# ---------------------------------------------------------------- entries


class Entry(NamedTuple):
    """One tensor to write: this rank's flat partition (`partitioned`) or the full tensor."""

    name: str
    tensor: torch.Tensor
    numel: int
    shape: tuple[int, ...]
    partitioned: bool


def param_entries(named: Sequence[tuple[str, torch.nn.Parameter]],
                  parts: Sequence[torch.Tensor] | None = None) -> list[Entry]:
    """Entries for `write_partitions` from named parameters (DeepSpeed's ZeRO-3 attributes).

    `parts[i]` replaces parameter i's data (e.g. its EMA shadow, same layout); a parameter
    without `ds_tensor` is unpartitioned (whole)."""
    out = []
    for i, (name, p) in enumerate(named):
        if hasattr(p, "ds_tensor"):
            t = parts[i] if parts is not None else p.ds_tensor
            out.append(Entry(name, t, int(p.ds_numel), tuple(p.ds_shape), True))
        else:
            t = parts[i] if parts is not None else p.data
            out.append(Entry(name, t, p.numel(), tuple(p.shape), False))
    return out


# ---------------------------------------------------------------- safetensors, streamed


def _st_dtype(dtype: torch.dtype, where: str) -> str:
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"{where}: dtype {dtype} is not supported (one of {sorted(map(str, _DTYPES))})") from None


def _itemsize(st_dtype: str) -> int:
    return _FROM_ST[st_dtype].itemsize


class _Out(NamedTuple):
    name: str
    dtype: str  # safetensors dtype string
    shape: tuple[int, ...]
    nbytes: int


def _data_order(items: Sequence[_Out]) -> list[_Out]:
    """Listed order, grouped by element size (largest first) so that every tensor is aligned."""
    return sorted(items, key=lambda o: -_itemsize(o.dtype))  # stable


def _header(items: Sequence[_Out], metadata: dict[str, str]) -> bytes:
    head: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for o in items:
        head[o.name] = {"dtype": o.dtype, "shape": list(o.shape), "data_offsets": [offset, offset + o.nbytes]}
        offset += o.nbytes
    raw = json.dumps(head, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _as_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor (no copy when already contiguous)."""
    flat = t.detach().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    flat = flat.contiguous()
    return memoryview(flat.view(torch.uint8).numpy())


@contextlib.contextmanager
def _atomic(path: str) -> Iterator[Any]:
    """Open a temp file next to `path`; renamed onto it only when the block succeeds."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def _stream(path: str, items: Sequence[_Out], metadata: dict[str, str],
            produce: Any) -> None:
    """Write a safetensors file: header from `items`, then `produce(item)` for each, in order.

    `produce(item)` returns the item's tensor (any shape, `item.nbytes` bytes), made only when
    it is written, so peak memory is one tensor."""
    items = _data_order(items)
    with _atomic(path) as fh:
        fh.write(_header(items, metadata))
        for o in items:
            t = produce(o)
            b = _as_bytes(t)
            if b.nbytes != o.nbytes:  # an internal inconsistency, never the caller's data
                raise RuntimeError(f"{path}: {o.name} has {b.nbytes} bytes, header says {o.nbytes}")
            fh.write(b)
            del t, b


# ---------------------------------------------------------------- write


def _check_world(world_size: int) -> None:
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")


def _check_rank(rank: int, world_size: int) -> None:
    _check_world(world_size)
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank!r}")


def write_partitions(path: str, entries: Iterable[Entry | tuple], *, rank: int, world_size: int,
                     kind: str) -> dict[str, Any]:
    """Write this rank's partitions of `entries` to `path` (atomically); returns the metadata.

    Each entry is (name, tensor, numel, shape, partitioned). Partitioned: `tensor` is this
    rank's flat partition, 1-D of length ceil(numel / world_size) (padding included; only the
    real elements are stored). Unpartitioned: the full tensor (numel elements), written by
    rank 0 only; other ranks skip it. Tensors keep their dtype; they may live on any device
    (copied to the CPU one at a time)."""
    _check_rank(rank, world_size)
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"{path}: kind must be a non-empty string, got {kind!r}")
    listed: list[dict[str, Any]] = []
    keep: dict[str, torch.Tensor] = {}
    outs: list[_Out] = []
    seen: set[str] = set()
    for raw in entries:
        e = Entry(*raw)
        where = f"{path}: {e.name!r}"
        if not isinstance(e.name, str) or not e.name or e.name == "__metadata__":
            raise ValueError(f"{path}: invalid tensor name {e.name!r}")
        if e.name in seen:
            raise ValueError(f"{where} is listed twice")
        seen.add(e.name)
        shape = tuple(int(d) for d in e.shape)
        numel = int(e.numel)
        if math.prod(shape) != numel:
            raise ValueError(f"{where}: shape {list(shape)} does not have numel {numel} elements")
        dt = _st_dtype(e.tensor.dtype, where)
        if e.partitioned:
            s = partition_size(numel, world_size)
            if e.tensor.dim() != 1 or e.tensor.numel() != s:
                raise ValueError(f"{where}: a partition at world size {world_size} must be 1-D of "
                                 f"ceil({numel} / {world_size}) = {s} elements, got shape {list(e.tensor.shape)}")
            start, stop = partition_range(numel, rank, world_size)
            part = e.tensor[: stop - start]
        else:
            if e.tensor.numel() != numel:
                raise ValueError(f"{where}: an unpartitioned tensor must have all {numel} elements, "
                                 f"got shape {list(e.tensor.shape)}")
            if rank != 0:
                continue
            s, start, stop, part = numel, 0, numel, e.tensor
        length = stop - start
        listed.append({"name": e.name, "shape": list(shape), "numel": numel, "partitioned": bool(e.partitioned),
                       "partition_size": s, "offset": start, "length": length, "dtype": dt})
        if length:
            keep[e.name] = part
            outs.append(_Out(e.name, dt, (length,), length * _itemsize(dt)))
    meta = {"format": FORMAT, "version": VERSION, "kind": kind, "rank": rank,
            "world_size": world_size, "tensors": listed}
    _stream(path, outs, {META_KEY: json.dumps(meta, separators=(",", ":"))}, lambda o: keep[o.name])
    return meta


# ---------------------------------------------------------------- read a file's header


@dataclass(frozen=True)
class _Listed:
    name: str
    shape: tuple[int, ...]
    numel: int
    partitioned: bool
    partition_size: int
    offset: int
    length: int
    dtype: str
    data_start: int  # absolute byte offset of the stored slice in the file (if length)


@dataclass(frozen=True)
class PartitionFile:
    """A partition file's metadata, validated against its safetensors header."""

    path: str
    kind: str
    rank: int
    world_size: int
    tensors: dict[str, _Listed]  # in listed order


def _bad(path: str, why: str) -> ValueError:
    return ValueError(f"{path}: {why}")


def _read_header(path: str) -> tuple[dict[str, Any], int]:
    """(safetensors header JSON, byte offset where the data starts)."""
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise _bad(path, "not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise _bad(path, f"not a safetensors file (header length {n}, file size {size})")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _bad(path, f"not a safetensors file (header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise _bad(path, "not a safetensors file (header is not a JSON object)")
    return header, 8 + n


def read_partition_file(path: str) -> PartitionFile:
    """Read and check a partition file's header (no tensor data is read)."""
    header, data_start = _read_header(path)
    data_len = os.path.getsize(path) - data_start
    raw = (header.get("__metadata__") or {}).get(META_KEY)
    if raw is None:
        raise _bad(path, f"not a TRIP partition file (no {META_KEY!r} in its metadata)")
    try:
        meta = json.loads(raw)
        if meta.get("format") != FORMAT:
            raise _bad(path, f"format {meta.get('format')!r}, expected {FORMAT!r}")
        if meta.get("version") != VERSION:
            raise _bad(path, f"partition format version {meta.get('version')!r}; this code reads {VERSION}")
        kind, rank, world = meta["kind"], meta["rank"], meta["world_size"]
        if not isinstance(kind, str) or not isinstance(world, int) or world < 1 \
                or not isinstance(rank, int) or not 0 <= rank < world:
            raise _bad(path, f"bad kind/rank/world_size {kind!r}/{rank!r}/{world!r}")
        tensors: dict[str, _Listed] = {}
        stored = {k for k in header if k != "__metadata__"}
        for t in meta["tensors"]:
            name = t["name"]
            where = f"tensor {name!r}"
            shape, numel, part = tuple(int(d) for d in t["shape"]), int(t["numel"]), bool(t["partitioned"])
            s, off, length, dt = int(t["partition_size"]), int(t["offset"]), int(t["length"]), t["dtype"]
            if name in tensors:
                raise _bad(path, f"{where} listed twice")
            if math.prod(shape) != numel:
                raise _bad(path, f"{where}: shape {list(shape)} vs numel {numel}")
            if dt not in _FROM_ST:
                raise _bad(path, f"{where}: unsupported dtype {dt!r}")
            if part:
                want = partition_size(numel, world), *partition_range(numel, rank, world)
            else:
                if rank != 0:
                    raise _bad(path, f"{where} is unpartitioned, but only rank 0 writes those (this is rank {rank})")
                want = numel, 0, numel
            if (s, off, off + length) != want:
                raise _bad(path, f"{where}: partition size/offset/length {s}/{off}/{length} do not follow "
                                 f"the partition rule at rank {rank} of {world} (expected {want[0]}/{want[1]}/{want[2] - want[1]})")
            begin = 0
            if length:
                info = header.get(name)
                if not isinstance(info, dict):
                    raise _bad(path, f"{where} is listed with {length} elements but not stored")
                begin, end = info["data_offsets"]
                if info["dtype"] != dt or list(info["shape"]) != [length] \
                        or end - begin != length * _itemsize(dt) or not 0 <= begin <= end <= data_len:
                    raise _bad(path, f"{where}: stored as {info}, metadata says {length} x {dt}")
                stored.discard(name)
            tensors[name] = _Listed(name, shape, numel, part, s, off, length, dt, data_start + begin)
        if stored:
            raise _bad(path, f"stores tensors its metadata does not list: {sorted(stored)[:5]}")
    except ValueError:
        raise
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise _bad(path, f"malformed {META_KEY!r} metadata ({type(e).__name__}: {e})") from None
    return PartitionFile(path, kind, rank, world, tensors)


def _same_tensor(a: _Listed, b: _Listed, pa: str, pb: str) -> None:
    if (a.shape, a.partitioned, a.dtype) != (b.shape, b.partitioned, b.dtype):
        raise ValueError(f"{a.name!r}: {pa} has shape {list(a.shape)} ({a.dtype}, partitioned={a.partitioned}), "
                         f"{pb} has {list(b.shape)} ({b.dtype}, partitioned={b.partitioned})")


def _one_checkpoint(infos: Sequence[PartitionFile], kind: str | None) -> tuple[str, int]:
    """Check that the files belong together: one kind, one world size, distinct ranks."""
    first = infos[0]
    want_kind = kind if kind is not None else first.kind
    by_rank: dict[int, str] = {}
    for f in infos:
        if f.kind != want_kind:
            raise ValueError(f"{f.path}: kind {f.kind!r}, but " + (
                f"{want_kind!r} was asked for" if kind is not None else f"{first.path} is {first.kind!r}"))
        if f.world_size != first.world_size:
            raise ValueError(f"{f.path}: written at world size {f.world_size}, but {first.path} "
                             f"at {first.world_size}")
        if f.rank in by_rank:
            raise ValueError(f"{f.path} and {by_rank[f.rank]} are both rank {f.rank}")
        by_rank[f.rank] = f.path
    # every rank lists the same partitioned tensors
    ref = min(infos, key=lambda f: f.rank)
    ref_part = {n: t for n, t in ref.tensors.items() if t.partitioned}
    for f in infos:
        part = {n: t for n, t in f.tensors.items() if t.partitioned}
        if part.keys() != ref_part.keys():
            diff = sorted(part.keys() ^ ref_part.keys())
            raise ValueError(f"{f.path} and {ref.path} list different partitioned tensors, e.g. {diff[:3]}")
        for n, t in part.items():
            _same_tensor(t, ref_part[n], f.path, ref.path)
    return want_kind, first.world_size


# ---------------------------------------------------------------- reshard


def read_local_partitions(files: Mapping[int, str], names_and_numels: Iterable[tuple],
                          *, rank: int, world_size: int, dtype: torch.dtype = torch.float32,
                          kind: str | None = None, strict: bool = True) -> dict[str, torch.Tensor]:
    """This rank's partitions (at `world_size`, any old one) from old ranks' partition files.

    `files`: old rank -> local path, at least those `source_ranks` names for this rank.
    `names_and_numels`: (name, numel) for each tensor wanted partitioned, or
    (name, numel, False) for one wanted whole. Returns name -> flat `dtype` tensor: the
    partition, ceil(numel / world_size) long with zeros in the padding, or all numel
    elements for a whole one. Only the needed slices are read (lazily, via safetensors).
    `strict`: the files must not hold (partitioned) tensors that were not asked for.
    ValueError when a needed file is missing (names the tensor and the old rank), when
    names, sizes, kinds or world sizes disagree.
    """
    from safetensors import safe_open

    _check_rank(rank, world_size)
    if not files:
        raise ValueError("no partition files given")
    infos: dict[int, PartitionFile] = {}
    for r, path in files.items():
        info = read_partition_file(path)
        if info.rank != r:
            raise ValueError(f"{path}: is rank {info.rank}'s file, given as rank {r}'s")
        infos[r] = info
    _, old_world = _one_checkpoint(list(infos.values()), kind)
    given = sorted(infos)
    catalogue: dict[str, _Listed] = {}
    for info in (infos[r] for r in given):
        for n, t in info.tensors.items():
            catalogue.setdefault(n, t)

    wanted: list[tuple[str, int, bool]] = []
    for item in names_and_numels:
        name, numel, *rest = item
        part = bool(rest[0]) if rest else True
        t = catalogue.get(name)
        if t is None:
            hint = "" if 0 in infos else " (tensors kept whole are only in old rank 0's file, which was not given)"
            raise ValueError(f"{name!r}: not in the old partition files of ranks {_ranks(given)}{hint}")
        if t.numel != numel:
            raise ValueError(f"{name!r}: {numel} elements asked for, the old files ({t.shape} in "
                             f"{infos[given[0]].path}) have {t.numel}")
        wanted.append((name, int(numel), part))
    if strict:
        asked = {w[0] for w in wanted}
        extra = [n for n in catalogue if n not in asked]
        if extra:
            raise ValueError(f"the old partition files hold {len(extra)} tensors not asked for, "
                             f"e.g. {extra[:3]} (pass strict=False to ignore them)")

    out: dict[str, torch.Tensor] = {}
    with contextlib.ExitStack() as stack:
        handles: dict[int, Any] = {}

        def handle(r: int) -> Any:
            if r not in handles:
                handles[r] = stack.enter_context(safe_open(infos[r].path, framework="pt"))
            return handles[r]

        for name, numel, part in wanted:
            t = catalogue[name]
            if part:
                start, stop = partition_range(numel, rank, world_size)
                buf = torch.zeros(partition_size(numel, world_size), dtype=dtype)
            else:
                start, stop = 0, numel
                buf = torch.empty(numel, dtype=dtype)
            if t.partitioned:
                layout = PartitionLayout(numel, old_world, t.partition_size)
                sources = [(r, *layout.range(r)) for r in layout.ranks(start, stop)]
            else:
                sources = [(0, 0, numel)] if stop > start else []
            for r, a, b in sources:
                lo, hi = max(a, start), min(b, stop)
                if r not in infos:
                    raise ValueError(
                        f"{name!r}: elements [{lo}, {hi}) are in old rank {r}'s file (world size "
                        f"{old_world}), which was not given (given: ranks {_ranks(given)})")
                piece = handle(r).get_slice(name)[lo - a: hi - a]
                buf[lo - start: hi - start].copy_(piece)
            out[name] = buf
    return out


def _ranks(ranks: Sequence[int]) -> str:
    return str(list(ranks)) if len(ranks) <= 8 else f"{list(ranks[:4])}...{list(ranks[-2:])} ({len(ranks)})"


# ---------------------------------------------------------------- consolidate


def _read_into(fd: int, buf: memoryview, offset: int, path: str) -> None:
    done = 0
    while done < buf.nbytes:
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n <= 0:
            raise ValueError(f"{path}: truncated (wanted {buf.nbytes} bytes at {offset})")
        done += n


def consolidate(files: Sequence[str], out_path: str, *, dtype: torch.dtype | None = None,
                kind: str | None = None, rename: Callable[[str], str | None] | None = None) -> dict[str, Any]:
    """Write every full tensor of one checkpoint kind to one safetensors file, streaming.

    `files`: the partition files of every rank of one kind (any order). Tensors keep the
    names and full shapes they were written with, and their stored dtype unless `dtype` is
    given; they are listed in the order given to `write_partitions` (rank 0's order), with
    the data grouped by element size (see the module docstring). The header is computed from
    the metadata first; then each tensor is assembled from its slices, read with plain file
    reads (no mmap: pages read do not stay in this process's memory), written, and dropped:
    peak memory is about one full tensor (two when converting dtype), never the model.
    The result loads with `safetensors.torch.load_file`. Returns a summary (kind,
    world_size, tensors, bytes). `rename(name)` gives a tensor's name in the output, or None to
    leave it out (e.g. one component of the model per file)."""
    if not files:
        raise ValueError("no partition files given")
    infos = [read_partition_file(p) for p in files]
    kind, world = _one_checkpoint(infos, kind)
    by_rank = {f.rank: f for f in infos}
    missing = [r for r in range(world) if r not in by_rank]
    if missing:
        raise ValueError(f"written at world size {world}, but the files of ranks {_ranks(missing)} are "
                         f"missing (given {len(files)} files, e.g. {infos[0].path})")
    order = list(by_rank[0].tensors.values())  # rank 0 lists every tensor
    outs = []
    listed: dict[str, _Listed] = {}
    for t in order:
        name = rename(t.name) if rename is not None else t.name
        if name is None:
            continue
        if name in listed:
            raise ValueError(f"{out_path}: two tensors renamed to {name!r}")
        dt = _st_dtype(dtype, out_path) if dtype is not None else t.dtype
        outs.append(_Out(name, dt, t.shape, t.numel * _itemsize(dt)))
        listed[name] = t
    fds: dict[int, int] = {}
    # One buffer, the size of the largest stored tensor, reused for every tensor: a fresh
    # allocation per tensor lets the allocator keep freed blocks, and the peak then drifts
    # to several tensors; reuse holds it at one (plus one converted copy with `dtype`).
    scratch = torch.empty(max((t.numel * _itemsize(t.dtype) for t in listed.values()), default=0),
                          dtype=torch.uint8)

    def produce(o: _Out) -> torch.Tensor:
        t = listed[o.name]
        item = _itemsize(t.dtype)
        full = scratch[: t.numel * item].view(_FROM_ST[t.dtype])
        view = memoryview(full.view(torch.uint8).numpy())
        parts = range(world) if t.partitioned else range(1)
        for r in parts:
            piece = by_rank[r].tensors[t.name]
            if piece.length:
                fd = fds.pop(r, None)
                if fd is None:
                    if len(fds) >= _MAX_OPEN:  # stay well under the usual 1024 descriptors
                        os.close(fds.pop(next(iter(fds))))
                    fd = os.open(by_rank[r].path, os.O_RDONLY)
                fds[r] = fd  # most recently used last
                _read_into(fd, view[piece.offset * item: (piece.offset + piece.length) * item],
                           piece.data_start, by_rank[r].path)
        del view
        full = full.view(t.shape)
        return full if dtype is None else full.to(dtype)

    meta = {"format": FORMAT, "version": VERSION, "kind": kind, "world_size": world}
    try:
        _stream(out_path, outs, {CONSOLIDATED_META_KEY: json.dumps(meta)}, produce)
    finally:
        for fd in fds.values():
            os.close(fd)
    return {"kind": kind, "world_size": world, "tensors": len(outs), "bytes": sum(o.nbytes for o in outs)}
