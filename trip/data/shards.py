"""The shard contract between preprocessing and training: index, writer, and the one reader.

One sample per clip, keys inside a WebDataset tar:
    <key>.latents.npy  float16 [F, C, h, w]  (already multiplied by the codec's scaling factor)
    <key>.text.npy     float16 [L, D]        (optional)
    <key>.json         {videoid, caption, fps, frame_stride, source_url, src_size, ...}
    <key>.txt          the caption
and per dataset prefix an `index.json` (schema version, shards with sample counts and
byte sizes, latent shape, codec identity, per-channel mean/std).

Buckets (optional): a dataset preprocessed into several shapes (`preprocess.buckets`)
lists them in `index["buckets"]`, each {name, height, width, frames, latent_shape,
samples}; every entry of `index["shards"]` then carries its "bucket" name, a shard holds
one bucket's samples only, and its name is `<bucket>/shard-NNNNNN.tar`. The top-level
`latent_shape` is the first bucket's. `dataset_buckets(index)` reads either form: a
dataset without buckets is one bucket named "all" holding every shard.

Writing: a shard is built in a local temporary file and only then committed to its final
name (rename on local disk; a single PUT on object storage, where an object appears whole
or not at all), so a reader never sees a partial shard. `index.json` is written last, the
same way, and is what loaders trust.

Reading: there is exactly one parser of shard bytes, so `data_tools validate` judges a
shard with the code training runs. A shard is fetched whole (`ShardFetcher`: one GET,
retries), its tar headers are parsed in place (`tar_members`), members are grouped into
samples by webdataset's `group_by_keys` (`read_samples`) and stay `memoryview`s of the
one buffer; `decode_sample` turns one into zero-copy `.npy` views and checks it against
the contract and the index. Why not `tarfile` + `np.load`: both copy every member, and
per-sample copies are what made plain webdataset CPU-bound on these samples. `.npy`
headers are parsed by numpy's own header reader, which never unpickles (object dtypes
are refused: the equivalent of `np.load(..., allow_pickle=False)`). Only `.npy`,
`.json` and `.txt` members are ever decoded.
"""

from __future__ import annotations

import glob
import http.client
import io
import json
import logging
import math
import os
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec
import numpy as np
from webdataset.tariterators import group_by_keys

from trip import storage

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
INDEX_NAME = "index.json"
SAMPLE_DTYPE = np.dtype("float16")  # latents and text states, as written and as read


def shard_name(index: int, bucket: str | None = None) -> str:
    """The shard's name under the dataset prefix: `shard-NNNNNN.tar`, inside its bucket's folder."""
    return f"{bucket}/shard-{index:06d}.tar" if bucket else f"shard-{index:06d}.tar"


def bucket_name(height: int, width: int, frames: int) -> str:
    """A bucket's name from its pixel size and frame count, e.g. `64x112x8`."""
    return f"{height}x{width}x{frames}"


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


# --------------------------------------------------------------------------- index


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
    bucket: str | None = None  # the bucket whose samples it holds (bucketed datasets only)


def build_index(shards: list[ShardInfo], *, latent_shape: list[int], text_shape: list[int] | None,
                codec: dict[str, Any], text_encoder: dict[str, Any] | None,
                extra: dict[str, Any] | None = None,
                buckets: Sequence[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The dataset's index.json content; mean/std are per latent channel over all samples.

    `buckets`: [{name, height, width, frames, latent_shape}] of a bucketed dataset (every
    shard's `bucket` names one); `latent_shape` is then the first bucket's."""
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
        "shards": [{"name": s.name, "samples": s.samples, "bytes": s.bytes,
                    **({"bucket": s.bucket} if buckets else {})} for s in shards],
        "latent_shape": list(buckets[0]["latent_shape"]) if buckets else list(latent_shape),
        "latent_dtype": SAMPLE_DTYPE.name,
        "text_shape": list(text_shape) if text_shape else None,
        "text_dtype": SAMPLE_DTYPE.name if text_shape else None,
        "codec": codec,
        "scaling_factor": codec.get("scaling_factor"),
        "text_encoder": text_encoder,
        "latent_mean": mean,
        "latent_std": std,
        "shard_stats": [asdict(s) for s in shards],
    }
    if buckets:
        names = [b["name"] for b in buckets]
        stray = sorted({s.name for s in shards if s.bucket not in names})
        if stray:
            raise ValueError(f"shards {stray[:5]} name no bucket of {names}")
        index["buckets"] = [{**{k: b[k] for k in ("name", "height", "width", "frames")},
                             "latent_shape": list(b["latent_shape"]),
                             "samples": sum(s.samples for s in shards if s.bucket == b["name"]),
                             "shards": sum(1 for s in shards if s.bucket == b["name"])} for b in buckets]
    if extra:
        index.update(extra)
    return index


@dataclass(frozen=True)
class Bucket:
    """One shape of a dataset: its samples all have `latent_shape` [F, C, h, w]."""

    name: str
    latent_shape: tuple[int, ...]
    shards: tuple[int, ...]  # indices into index["shards"], in index order
    samples: int
    height: int | None = None  # pixels (None when the index does not say)
    width: int | None = None
    frames: int | None = None


def dataset_buckets(index: dict[str, Any], url: str = "index.json") -> list[Bucket]:
    """The dataset's buckets in index order; one bucket "all" for a dataset without buckets.

    Raises ValueError naming `url` and the shard or bucket when the two lists disagree."""
    shards = index["shards"]
    if not index.get("buckets"):
        return [Bucket(name="all", latent_shape=tuple(int(x) for x in index["latent_shape"]),
                       shards=tuple(range(len(shards))), samples=sum(int(s["samples"]) for s in shards))]
    members: dict[str, list[int]] = {b["name"]: [] for b in index["buckets"]}
    for i, s in enumerate(shards):
        if s.get("bucket") not in members:
            raise ValueError(f"{url}: shard {s.get('name')} names bucket {s.get('bucket')!r}, which is not "
                             f"in the index's buckets {list(members)}")
        members[s["bucket"]].append(i)
    out = []
    for b in index["buckets"]:
        count = sum(int(shards[i]["samples"]) for i in members[b["name"]])
        if count != int(b["samples"]):
            raise ValueError(f"{url}: bucket {b['name']} says {b['samples']} samples, its shards hold {count}")
        out.append(Bucket(name=b["name"], latent_shape=tuple(int(x) for x in b["latent_shape"]),
                          shards=tuple(members[b["name"]]), samples=count, height=b.get("height"),
                          width=b.get("width"), frames=b.get("frames")))
    return out


def shard_latent_shapes(index: dict[str, Any]) -> list[tuple[int, ...]]:
    """The latent shape of each entry of index["shards"] (its bucket's)."""
    shapes: list[tuple[int, ...]] = [()] * len(index["shards"])
    for b in dataset_buckets(index):
        for i in b.shards:
            shapes[i] = b.latent_shape
    return shapes


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


# --------------------------------------------------------------------------- writer


class ShardWriter:
    """Write one shard: `add(...)` samples, then `commit()` (or `abort()`)."""

    def __init__(self, prefix: str, index: int, bucket: str | None = None) -> None:
        self.prefix, self.bucket = prefix, bucket
        self.name = shard_name(index, bucket)
        self.url = storage.join(prefix, self.name)
        # A local destination gets its partial file beside it (a hidden name no reader lists),
        # so the commit is a rename, not a second write of every byte; object storage gets a
        # local temporary file and one upload.
        self._dest = storage.local_path(self.url)
        self._base = self.name.rsplit("/", 1)[-1]
        folder = None
        if self._dest is not None:
            folder = os.path.dirname(os.path.abspath(self._dest))
            os.makedirs(folder, exist_ok=True)
            for stale in glob.glob(os.path.join(glob.escape(folder), f".{self._base}.partial-*")):
                os.unlink(stale)  # left by an attempt at this shard that was killed
        fd, self._tmp = tempfile.mkstemp(prefix=f".{self._base}.partial-", suffix=".tar", dir=folder)
        os.close(fd)
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        self._tar.copybufsize = 8 << 20  # members are written in one call, not 16 KiB pieces
        self.samples = 0
        self._sum: np.ndarray | None = None
        self._sumsq: np.ndarray | None = None
        self._count = 0

    def _add_member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0  # reproducible bytes: a rerun writes the very same shard
        info.mode = 0o644
        self._tar.addfile(info, io.BytesIO(data))

    def add(self, key: str, latents: np.ndarray, meta: dict[str, Any], caption: str,
            text: np.ndarray | None = None) -> None:
        """Append one sample: latents [F, C, h, w] and text states [L, D] are stored as float16."""
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
        if latents.ndim != 4:
            raise ValueError(f"latents for {key} must be [F, C, h, w], got shape {latents.shape}")
        lat = latents.astype(SAMPLE_DTYPE, copy=False)
        self._add_member(f"{key}.latents.npy", npy_bytes(lat))
        if text is not None:
            if text.ndim != 2:
                raise ValueError(f"text states for {key} must be [L, D], got shape {text.shape}")
            self._add_member(f"{key}.text.npy", npy_bytes(text.astype(SAMPLE_DTYPE)))
        self._add_member(f"{key}.json", json.dumps(meta, sort_keys=True).encode())
        self._add_member(f"{key}.txt", caption.encode())
        # float16 values square exactly in float32; the sums accumulate in float64
        x = lat.astype(np.float32)
        s = x.sum(axis=(0, 2, 3), dtype=np.float64)
        sq = np.square(x).sum(axis=(0, 2, 3), dtype=np.float64)
        self._sum = s if self._sum is None else self._sum + s
        self._sumsq = sq if self._sumsq is None else self._sumsq + sq
        self._count += x.shape[0] * x.shape[2] * x.shape[3]
        self.samples += 1

    def commit(self) -> ShardInfo:
        """Close the tar and make it visible under its final name."""
        self._tar.close()
        try:
            size = os.path.getsize(self._tmp)
            if self._dest is None:
                fs, path = storage.filesystem(self.url)
                storage.retry(lambda: fs.put_file(self._tmp, path), what=f"upload of {self.url}")
            else:
                os.chmod(self._tmp, 0o644)  # mkstemp's 0600 would hide the shard from other users
                os.replace(self._tmp, self._dest)
        finally:
            if os.path.exists(self._tmp):
                os.unlink(self._tmp)
        return ShardInfo(
            name=self.name, samples=self.samples, bytes=size, bucket=self.bucket,
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


# --------------------------------------------------------------------------- the reader

_BLOCK = 512


class CorruptShardError(ValueError):
    """A shard's bytes do not form a valid tar (bad header, truncated member)."""


def open_filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """A fresh filesystem for `url` (never a cached instance: s3fs objects are not fork-safe)."""
    path = storage.local_path(url)
    if path is not None:
        return fsspec.filesystem("file"), path
    protocol = url.split("://", 1)[0]
    fs = fsspec.filesystem(protocol, skip_instance_cache=True, **storage.storage_options(url))
    return fs, fs._strip_protocol(url)


class ShardFetcher:
    """Whole-object reads of shards, made inside the process that uses them.

    S3 objects are read with a presigned GET (signed locally by s3fs/botocore from the
    environment's credentials) straight into one preallocated buffer: on these machines
    that took half the CPU of s3fs' own read path and ran 2-4x faster against the moto
    server. Presigned URLs carry a signature, so they are never logged or put in errors.
    Any other filesystem, or S3 where signing fails (anonymous access), uses `cat_file`.
    """

    def __init__(self, url: str, *, retries: int, base_delay: float = 0.2, timeout: float = 60.0) -> None:
        self.fs, _ = open_filesystem(url)
        self.retries, self.base_delay, self.timeout = retries, base_delay, timeout
        self.presign = url.startswith(("s3://", "s3a://"))

    def fetch(self, url: str) -> bytes | bytearray:
        """The whole object; transient errors are retried with exponential backoff.

        FileNotFoundError and PermissionError are not transient and propagate at once.
        """
        for attempt in range(self.retries + 1):
            try:
                return self._read(url)
            except (FileNotFoundError, PermissionError):
                raise
            except (OSError, http.client.HTTPException) as e:  # resets, timeouts, 5xx
                if attempt == self.retries:
                    raise OSError(f"reading shard {url} failed after {self.retries + 1} attempts: "
                                  f"{type(e).__name__}: {e}") from None
                delay = self.base_delay * 2**attempt
                log.warning("reading shard %s failed (%s: %s); retry %d/%d in %.1fs", url,
                            type(e).__name__, e, attempt + 1, self.retries, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _read(self, url: str) -> bytes | bytearray:
        path = self.fs._strip_protocol(url)
        if self.presign:
            try:
                signed = self.fs.url(path, expires=3600)
            except Exception as e:  # no credentials to sign with: s3fs reads it instead
                log.info("cannot presign S3 reads (%s); using s3fs reads", type(e).__name__)
                self.presign = False
            else:
                return self._http_get(signed, url)
        return self.fs.cat_file(path)

    def _http_get(self, signed: str, url: str) -> bytearray:
        try:
            with urllib.request.urlopen(signed, timeout=self.timeout) as resp:
                size = int(resp.headers["Content-Length"])
                buf = bytearray(size)
                view, got = memoryview(buf), 0
                while got < size:
                    n = resp.readinto(view[got:])
                    if not n:
                        raise http.client.IncompleteRead(bytes(0), size - got)
                    got += n
                return buf
        except urllib.error.HTTPError as e:  # the status only: e.url holds the signature
            if e.code == 404:
                raise FileNotFoundError(f"{url} does not exist") from None
            if e.code in (401, 403):
                raise PermissionError(f"{url}: access denied (HTTP {e.code})") from None
            raise OSError(f"{url}: HTTP {e.code} {e.reason}") from None


def _octal(field: bytes) -> int:
    """A tar numeric field: octal text, or GNU base-256 when the high bit is set."""
    if field[:1] and field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    text = field.rstrip(b"\0 ").strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise CorruptShardError(f"bad tar numeric field {field!r}") from None


def tar_members(buf: bytes | bytearray, url: str) -> Iterator[dict[str, Any]]:
    """Regular-file members of a tar held in `buf`, as webdataset file samples.

    Yields {"fname": str, "data": memoryview, "__url__": url}. Raises CorruptShardError
    at the first bad header or truncated member (members before it were already yielded).
    """
    view = memoryview(buf)
    offset, long_name = 0, None
    while offset + _BLOCK <= len(buf):
        header = buf[offset:offset + _BLOCK]
        if header.count(0) == _BLOCK:  # end-of-archive marker
            return
        try:
            stored = _octal(header[148:156])
        except CorruptShardError:
            stored = -1
        if stored != sum(header) - sum(header[148:156]) + 8 * 32:
            raise CorruptShardError(f"{url}: bad tar header checksum at byte {offset}")
        size = _octal(header[124:136])
        kind = header[156:157]
        start = offset + _BLOCK
        if start + size > len(buf):
            raise CorruptShardError(f"{url}: truncated member at byte {offset} "
                                    f"({size} bytes declared, {len(buf) - start} present)")
        offset = start + (size + _BLOCK - 1) // _BLOCK * _BLOCK
        if kind == b"L":  # GNU long name: the next member's name is this member's data
            long_name = bytes(view[start:start + size]).rstrip(b"\0").decode()
            continue
        if kind == b"x":  # pax header: take the path record, ignore the rest
            for rec in bytes(view[start:start + size]).decode().splitlines():
                if " path=" in rec:
                    long_name = rec.split(" path=", 1)[1]
            continue
        if kind not in (b"0", b"\0"):
            long_name = None
            continue
        name = long_name
        if name is None:
            name = header[:100].rstrip(b"\0").decode()
            prefix = header[345:500].rstrip(b"\0").decode() if header[257:262] == b"ustar" else ""
            name = f"{prefix}/{name}" if prefix else name
        long_name = None
        yield {"fname": name, "data": view[start:start + size], "__url__": url}
    if offset < len(buf):
        raise CorruptShardError(f"{url}: truncated tar header at byte {offset}")


def read_samples(buf: bytes | bytearray, url: str) -> tuple[list[dict[str, Any]], str | None]:
    """Samples of a shard in tar order, and the error that cut the walk short (or None)."""
    problems: list[str] = []

    def members() -> Iterator[dict[str, Any]]:
        try:
            yield from tar_members(buf, url)
        except CorruptShardError as e:
            problems.append(str(e))

    def note(exn: Exception) -> bool:  # group_by_keys handler: record, keep going
        problems.append(f"{url}: {exn.args[0] if exn.args else exn}")
        return True

    samples = list(group_by_keys(members(), handler=note))
    return samples, "; ".join(problems) or None


_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...], bool]] = {}


def _parse_npy_header(header: bytes) -> tuple[np.dtype, tuple[int, ...], bool]:
    fp = io.BytesIO(header)
    try:
        version = np.lib.format.read_magic(fp)
        reader = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                  else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = reader(fp)
    except Exception as e:  # numpy's header reader raises tokenizer, syntax and type errors too
        raise ValueError(f"bad .npy header ({type(e).__name__}: {e})") from None
    if dtype.hasobject:
        raise ValueError("object arrays are refused (they would need pickle)")
    if any(n < 0 for n in shape):
        raise ValueError(f"bad .npy header (negative shape {shape})")
    return dtype, tuple(shape), bool(fortran)


def npy_view(data: memoryview) -> np.ndarray:
    """A read-only array viewing an .npy member's bytes (no copy); ValueError if malformed."""
    if bytes(data[:6]) != b"\x93NUMPY" or len(data) < 10:
        raise ValueError("not an .npy member (bad magic)")
    major = data[6]
    if major == 1:
        header_len, start = int.from_bytes(data[8:10], "little"), 10
    elif major in (2, 3):
        header_len, start = int.from_bytes(data[8:12], "little"), 12
    else:
        raise ValueError(f"unsupported .npy version {major}")
    end = start + header_len
    if end > len(data):
        raise ValueError(f"bad .npy header (declares {header_len} bytes, {len(data) - start} present)")
    header = bytes(data[:end])
    parsed = _HEADERS.get(header)
    if parsed is None:
        parsed = _parse_npy_header(header)
        if len(_HEADERS) < 64:
            _HEADERS[header] = parsed
    dtype, shape, fortran = parsed
    count = math.prod(shape)
    if end + count * dtype.itemsize > len(data):
        raise ValueError(f"truncated .npy data ({len(data) - end} of {count * dtype.itemsize} bytes)")
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=end)
    return arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)


# --------------------------------------------------------------------------- decoded samples


class BadSample(ValueError):
    """A sample outside the contract; the message names the shard and the member at fault."""

    def __init__(self, url: str, key: str, why: str) -> None:
        super().__init__(f"{url}: {why}")
        self.url, self.key, self.why = url, key, why


@dataclass(frozen=True)
class Sample:
    """One decoded sample; the arrays are read-only views of the shard's bytes."""

    key: str
    latents: np.ndarray  # float16 [F, C, h, w]
    text: np.ndarray | None  # float16 [L, D], None when the shards carry no text states
    meta: dict[str, Any]  # the .json member
    caption: str  # the .txt member


def _finite(arr: np.ndarray) -> bool:
    """No NaN or inf in a float16 array (one NaN latent makes a whole step's loss NaN).

    Tested on the bits (NaN and inf have an all-ones exponent): ~15 us for a
    16x4x32x32 latent, 7x faster than np.isfinite on float16.
    """
    return arr.size == 0 or int((arr.view(np.uint16) & 0x7FFF).max()) < 0x7C00


def _array(sample: dict[str, Any], key: str, ext: str,
           shape: Sequence[int] | None) -> tuple[np.ndarray | None, str | None]:
    """The float16 array of member `<key>.<ext>`, or None and why it breaks the contract."""
    member = f"{key}.{ext}"
    try:
        arr = npy_view(sample[ext])
    except ValueError as e:
        return None, f"member {member}: {e}"
    if arr.dtype != SAMPLE_DTYPE:
        return None, f"member {member}: dtype {arr.dtype}, the contract says {SAMPLE_DTYPE}"
    if shape is not None and list(arr.shape) != list(shape):
        return None, f"member {member}: shape {list(arr.shape)}, index.json says {list(shape)}"
    if not _finite(arr):
        return None, f"member {member}: holds NaN or inf"
    return arr, None


def decode_sample(sample: dict[str, Any], url: str, *, latent_shape: Sequence[int] | None = None,
                  text_shape: Sequence[int] | None = None) -> Sample:
    """Check one `read_samples` sample against the contract and decode it (no copies).

    `latent_shape`/`text_shape` are index.json's; with `text_shape` set the text states are
    required, otherwise they are decoded when present. Raises BadSample listing every
    problem of the sample, each naming its member.
    """
    key = sample["__key__"]
    problems = [f"member {key}.{ext} missing" for ext in ("latents.npy", "json", "txt") if ext not in sample]
    if text_shape is not None and "text.npy" not in sample:
        problems.append(f"member {key}.text.npy missing (index.json has text_shape {list(text_shape)})")
    latents = text = None
    if "latents.npy" in sample:
        latents, why = _array(sample, key, "latents.npy", latent_shape)
        problems += [why] if why else []
    if "text.npy" in sample:
        text, why = _array(sample, key, "text.npy", text_shape)
        problems += [why] if why else []
    meta: Any = {}
    if "json" in sample:
        try:
            meta = json.loads(bytes(sample["json"]))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            problems.append(f"member {key}.json: not valid JSON ({e})")
        else:
            if not isinstance(meta, dict):
                problems.append(f"member {key}.json: not a JSON object")
    caption = ""
    if "txt" in sample:
        try:
            caption = bytes(sample["txt"]).decode("utf-8")
        except UnicodeDecodeError as e:
            problems.append(f"member {key}.txt: not UTF-8 ({e})")
    if problems:
        raise BadSample(url, key, "; ".join(problems))
    assert latents is not None
    return Sample(key=key, latents=latents, text=text, meta=meta, caption=caption)


@dataclass
class ShardContents:
    """A whole shard read through the loader's reader: what decoded, what did not, and why."""

    url: str
    keys: list[str]  # every sample the tar walk reached, in tar order
    samples: list[Sample]  # the good ones, in tar order
    bad: dict[str, str]  # key -> why, for samples outside the contract
    error: str | None  # what cut the tar walk short (the samples after it are unreadable)


def read_shard(url: str, *, latent_shape: Sequence[int] | None = None,
               text_shape: Sequence[int] | None = None) -> ShardContents:
    """Read and decode every sample of the shard at `url` (for tools and tests: one GET,
    no retries; training reads through `ShardFetcher` and decodes per batch)."""
    raw, error = read_samples(storage.read_bytes(url), url)
    samples, bad = [], {}
    for s in raw:
        try:
            samples.append(decode_sample(s, url, latent_shape=latent_shape, text_shape=text_shape))
        except BadSample as e:
            bad[e.key] = e.why
    return ShardContents(url=url, keys=[s["__key__"] for s in raw], samples=samples, bad=bad, error=error)
