"""Reading one latent shard: a whole-object fetch with retries, a zero-copy tar walk, npy views.

Why not `tarfile` + `np.load`: both copy every member, and per-sample copies are what
made plain webdataset CPU-bound on these samples. Here a shard is fetched with a single
GET (`ShardFetcher`), tar headers are parsed in place, members are handed on as
`memoryview`s of that one buffer, and `.npy` members become `np.frombuffer` views after
their header is parsed by numpy's own header reader (which never unpickles: object
dtypes are refused, the equivalent of `np.load(..., allow_pickle=False)`). The grouping
of members into samples is webdataset's own `group_by_keys` stage.

Only `.npy`, `.json` and `.txt` members are ever decoded, and only by the loader.
"""

from __future__ import annotations

import http.client
import io
import logging
import math
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import fsspec
import numpy as np
from webdataset.tariterators import group_by_keys

from trip import storage

log = logging.getLogger(__name__)

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
    header = bytes(data[:end])
    parsed = _HEADERS.get(header)
    if parsed is None:
        fp = io.BytesIO(header)
        version = np.lib.format.read_magic(fp)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = reader(fp)
        if dtype.hasobject:
            raise ValueError("object arrays are refused (they would need pickle)")
        parsed = (dtype, tuple(shape), bool(fortran))
        if len(_HEADERS) < 64:
            _HEADERS[header] = parsed
    dtype, shape, fortran = parsed
    count = math.prod(shape)
    if end + count * dtype.itemsize > len(data):
        raise ValueError(f"truncated .npy data ({len(data) - end} of {count * dtype.itemsize} bytes)")
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=end)
    return arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)
