"""Object storage access: every path is a string, fsspec only where "://" appears.

S3-compatible endpoints (MinIO, Ceph, R2, a moto server in tests) come from the
environment (`AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL`), credentials from the standard
AWS variables or an attached role. Nothing here reads credentials from a config file,
and nothing here logs them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, TypeVar

import fsspec

T = TypeVar("T")


def is_url(path: str) -> bool:
    return "://" in str(path)


def local_path(url: str) -> str | None:
    """The local filesystem path of a plain path or file:// URL; None for remote storage."""
    if url.startswith("file://"):
        return url[len("file://"):]
    return None if is_url(url) else url


def s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def storage_options(url: str) -> dict[str, Any]:
    """fsspec options for `url` taken from the environment (never from config files)."""
    if str(url).startswith(("s3://", "s3a://")):
        opts: dict[str, Any] = {}
        endpoint = s3_endpoint()
        if endpoint:
            opts["endpoint_url"] = endpoint
        return opts
    return {}


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path within it) for a local path or URL."""
    if not is_url(url):
        return fsspec.filesystem("file"), os.path.abspath(url)
    fs, path = fsspec.core.url_to_fs(url, **storage_options(url))
    return fs, path


def join(base: str, *parts: str) -> str:
    """Join path components with '/', keeping the URL scheme."""
    out = str(base).rstrip("/")
    for p in parts:
        out = f"{out}/{str(p).strip('/')}"
    return out


def open_file(url: str, mode: str = "rb") -> IO[Any]:
    fs, path = filesystem(url)
    return fs.open(path, mode)


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    return fs.cat_file(path)


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write `data` so readers never see a partial object.

    Local files: write a temp file in the same directory, then rename (atomic on POSIX).
    Object stores: a single PUT is already atomic (an object appears whole or not at all).
    """
    path = local_path(url)
    if path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return
    fs, path = filesystem(url)
    fs.pipe_file(path, data)


def retry(fn: Callable[[], T], *, attempts: int = 5, base_delay: float = 0.2,
          what: str = "storage operation", retry_on: tuple[type[BaseException], ...] = (OSError,)) -> T:
    """Call `fn`, retrying transient errors with exponential backoff."""
    for i in range(attempts):
        try:
            return fn()
        except FileNotFoundError:
            raise
        except retry_on as e:
            if i == attempts - 1:
                raise OSError(f"{what} failed after {attempts} attempts: {e}") from e
            time.sleep(base_delay * 2**i)
    raise AssertionError("unreachable")


def local_copy(url: str, cache_dir: str | None = None) -> str:
    """A local directory/file holding `url`'s content (downloaded once when remote)."""
    path = local_path(url)
    if path is not None:
        if not os.path.exists(path):
            raise FileNotFoundError(f"path does not exist: {url}")
        return path
    fs, path = filesystem(url)
    if not fs.exists(path):
        raise FileNotFoundError(f"path does not exist: {url}")
    root = Path(cache_dir or os.environ.get("TRIP_CACHE", Path(tempfile.gettempdir()) / "trip-cache"))
    dest = root / url.replace("://", "/").strip("/")
    marker = dest.with_name(dest.name + ".complete")
    if marker.exists():
        return str(dest)
    tmp = dest.with_name(dest.name + f".partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    if fs.isdir(path):
        fs.get(path.rstrip("/") + "/", str(tmp), recursive=True)
    else:
        fs.get(path, str(tmp))
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    marker.touch()
    return str(dest)


@contextlib.contextmanager
def local_dir_for_upload(url: str) -> Iterator[str]:
    """Yield a local directory; on success its content is uploaded to `url` (if remote)."""
    path = local_path(url)
    if path is not None:
        os.makedirs(path, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory() as tmp:
        yield tmp
        fs, path = filesystem(url)
        fs.put(tmp.rstrip("/") + "/", path, recursive=True)
