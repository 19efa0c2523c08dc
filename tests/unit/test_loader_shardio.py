"""Zero-copy shard reading: tar walk, npy views, refusal of pickles, truncation."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest

from data_tools.shards import npy_bytes
from trip.data.shardio import CorruptShardError, npy_view, read_samples, tar_members


def _tar(members: dict[str, bytes], long_name: bool = False) -> bytes:
    buf = io.BytesIO()
    fmt = tarfile.GNU_FORMAT if long_name else tarfile.USTAR_FORMAT
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_npy_view_matches_np_load_without_copying() -> None:
    for arr in (np.arange(24, dtype=np.float16).reshape(2, 3, 4), np.asfortranarray(np.ones((3, 5))),
                np.zeros((0, 4), np.float32)):
        raw = npy_bytes(arr)
        view = npy_view(memoryview(raw))
        assert view.dtype == arr.dtype and np.array_equal(view, np.load(io.BytesIO(raw)))
    view = npy_view(memoryview(npy_bytes(np.ones((4, 4), np.float16))))
    assert not view.flags.owndata and not view.flags.writeable


def test_npy_view_refuses_object_arrays_bad_magic_and_truncation() -> None:
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="object arrays"):
        npy_view(memoryview(buf.getvalue()))
    with pytest.raises(ValueError, match="magic"):
        npy_view(memoryview(b"PK\x03\x04" + b"\0" * 100))
    raw = npy_bytes(np.ones((8, 8), np.float16))
    with pytest.raises(ValueError, match="truncated"):
        npy_view(memoryview(raw[:-10]))


@pytest.mark.parametrize("long_name", [False, True])
def test_tar_members_equal_tarfile_contents(long_name: bool) -> None:
    name = ("d" * 120 + "/") if long_name else ""
    members = {f"{name}a.latents.npy": b"x" * 700, f"{name}a.txt": b"hello", f"{name}b.txt": b""}
    got = {m["fname"]: bytes(m["data"]) for m in tar_members(_tar(members, long_name), "mem.tar")}
    assert got == members


def test_truncated_tar_yields_what_is_intact_then_reports() -> None:
    raw = _tar({"a.txt": b"1" * 600, "b.txt": b"2" * 600, "c.txt": b"3" * 600})
    samples, error = read_samples(raw[:2000], "cut.tar")
    assert [s["__key__"] for s in samples] == ["a"]
    assert error and "cut.tar" in error and "truncated" in error
    garbage = bytes(range(256)) * 8
    with pytest.raises(CorruptShardError, match="checksum"):
        list(tar_members(garbage, "junk.tar"))


def test_s3_fetch_retries_then_names_the_shard_and_never_the_signed_url(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import socket

    from trip.data.shardio import ShardFetcher

    with socket.socket() as s:  # a port nobody listens on: every GET is refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-never-logged")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    fetcher = ShardFetcher("s3://bucket/ds/shard-000000.tar", retries=2, base_delay=0.01)
    with pytest.raises(OSError, match=r"s3://bucket/ds/shard-000000\.tar failed after 3 attempts") as err:
        fetcher.fetch("s3://bucket/ds/shard-000000.tar")
    assert fetcher.presign  # the signed path was taken, not a fallback
    logged = caplog.text + str(err.value)
    assert "retry 2/2" in caplog.text
    assert "Signature" not in logged and "secret-never-logged" not in logged
