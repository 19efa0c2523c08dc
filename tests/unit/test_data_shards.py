"""The shard contract (trip.data.shards): what the writer writes the one reader reads back,
the index agrees with the shards, the zero-copy tar walk and npy views, refusal of pickles,
truncation, and `data_tools validate` judging a corrupted dataset exactly as the loader does."""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest

from data_tools.check import check_shard, validate_dataset
from data_tools.cli import main as data_tools_main
from data_tools.synth import sample_key, write_synthetic_dataset
from trip.config import DataConfig
from trip.data import LatentLoader
from trip.data.shards import (
    SCHEMA_VERSION,
    BadSample,
    CorruptShardError,
    ShardWriter,
    build_index,
    decode_sample,
    npy_bytes,
    npy_view,
    read_index,
    read_samples,
    read_shard,
    tar_members,
    write_index,
)


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


def test_any_garbled_npy_header_is_a_value_error() -> None:
    raw = npy_bytes(np.ones((4, 3, 4, 4), np.float16))
    rng = np.random.default_rng(0)
    for _ in range(3000):  # numpy's header reader alone raises tokenizer, syntax and type errors
        garbled = bytearray(raw)
        for at in rng.integers(0, 128, size=rng.integers(1, 4)):
            garbled[at] = int(rng.integers(0, 256))
        try:
            npy_view(memoryview(bytes(garbled)))
        except ValueError:
            pass


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

    from trip.data.shards import ShardFetcher

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


def test_what_the_writer_writes_the_reader_reads_back_and_the_index_agrees(tmp_path: Path) -> None:
    prefix = str(tmp_path / "ds")
    rng = np.random.default_rng(0)
    written: dict[str, tuple[np.ndarray, np.ndarray, dict, str]] = {}
    infos = []
    for shard, keys in enumerate([["a", "b", "c"], ["d"]]):
        writer = ShardWriter(prefix, shard)
        for key in keys:
            lat = rng.standard_normal((3, 2, 4, 4)).astype(np.float32)  # stored as float16
            text = rng.standard_normal((5, 6)).astype(np.float16)
            meta, caption = {"videoid": key, "fps": 8.0}, f"a red circle {key} \u00e9"
            writer.add(key, lat, meta, caption, text)
            written[key] = (lat.astype(np.float16), text, meta, caption)
        infos.append(writer.commit())
    write_index(prefix, build_index(infos, latent_shape=[3, 2, 4, 4], text_shape=[5, 6],
                                    codec={"kind": "synthetic", "scaling_factor": 1.0}, text_encoder=None))

    index = read_index(prefix)
    assert index["schema_version"] == SCHEMA_VERSION and index["num_samples"] == 4
    got = {}
    for entry in index["shards"]:
        contents = read_shard(os.path.join(prefix, entry["name"]), latent_shape=index["latent_shape"],
                              text_shape=index["text_shape"])
        assert contents.error is None and contents.bad == {}
        assert len(contents.keys) == entry["samples"]
        assert os.path.getsize(os.path.join(prefix, entry["name"])) == entry["bytes"]
        got.update({s.key: s for s in contents.samples})
    assert list(got) == ["a", "b", "c", "d"]  # tar order, index order
    for key, (lat, text, meta, caption) in written.items():
        s = got[key]
        assert s.latents.dtype == np.float16 and s.latents.tobytes() == lat.tobytes()
        assert s.text is not None and s.text.tobytes() == text.tobytes()
        assert (s.meta, s.caption) == (meta, caption)
    all_lat = np.stack([w[0] for w in written.values()]).astype(np.float64)
    np.testing.assert_allclose(index["latent_mean"], all_lat.mean(axis=(0, 1, 3, 4)), rtol=1e-9)
    np.testing.assert_allclose(index["latent_std"], all_lat.std(axis=(0, 1, 3, 4)), rtol=1e-6)

    raw = json.loads(Path(prefix, "index.json").read_text())
    raw["schema_version"] = SCHEMA_VERSION + 1
    Path(prefix, "index.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="schema_version 2 is not supported"):
        read_index(prefix)


def test_a_shard_is_invisible_until_committed_and_a_killed_attempt_leaves_nothing_behind(tmp_path: Path) -> None:
    prefix = tmp_path / "ds"
    lat = np.zeros((1, 2, 2, 2), np.float16)
    killed = ShardWriter(str(prefix), 0)  # an attempt that never commits nor aborts (SIGKILL)
    killed.add("a", lat, {}, "x")
    (partial,) = prefix.iterdir()  # a hidden name beside the shard, which no reader lists
    assert partial.name.startswith(".shard-000000.tar.partial-")
    assert not (prefix / "shard-000000.tar").exists()
    retry = ShardWriter(str(prefix), 0)
    retry.add("a", lat, {}, "x")
    info = retry.commit()
    assert sorted(p.name for p in prefix.iterdir()) == ["shard-000000.tar"]
    assert info.bytes == (prefix / "shard-000000.tar").stat().st_size
    assert oct((prefix / "shard-000000.tar").stat().st_mode & 0o777) == oct(0o644)


def _member_offset(path: Path, member: str) -> int:
    with tarfile.open(path) as tar:
        return tar.getmember(member).offset_data


def _patch(path: Path, offset: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset:offset + len(data)] = data
    path.write_bytes(bytes(raw))


def _garble_npy_header(path: Path, key: str) -> None:
    """Same length, still npy magic, but the header dict no longer parses."""
    member = f"{key}.latents.npy"
    start = _member_offset(path, member)
    header = path.read_bytes()[start:start + 128]
    at = header.index(b"'shape': (")
    _patch(path, start + at, b"'shape': ((")


def test_a_garbled_npy_header_is_a_value_error_naming_shard_and_member(tmp_path: Path) -> None:
    prefix = tmp_path / "ds"
    write_synthetic_dataset(str(prefix), [3])
    shard = prefix / "shard-000000.tar"
    _garble_npy_header(shard, sample_key(0, 1))
    raw, error = read_samples(shard.read_bytes(), str(shard))
    assert error is None and len(raw) == 3
    with pytest.raises(BadSample) as err:
        decode_sample(raw[1], str(shard), latent_shape=[4, 3, 4, 4])
    assert isinstance(err.value, ValueError)
    assert str(shard) in str(err.value) and f"{sample_key(0, 1)}.latents.npy: bad .npy header" in str(err.value)
    contents = read_shard(str(shard))
    assert list(contents.bad) == [sample_key(0, 1)] and len(contents.samples) == 2


SIZES = [4, 5, 6, 3, 2]


@pytest.fixture()
def corrupted(tmp_path: Path) -> str:
    """A dataset with one intact shard and every kind of damage in the others."""
    prefix = tmp_path / "ds"
    write_synthetic_dataset(str(prefix), SIZES)
    shard = [prefix / f"shard-{i:06d}.tar" for i in range(len(SIZES))]
    _garble_npy_header(shard[0], sample_key(0, 1))
    # flipped bytes in a member: a .json that no longer parses, a NaN among the latents
    _patch(shard[1], _member_offset(shard[1], f"{sample_key(1, 2)}.json"), b"\xff\xfe")
    nan_at = _member_offset(shard[1], f"{sample_key(1, 4)}.latents.npy") + 128 + 2 * 7
    _patch(shard[1], nan_at, np.array([np.nan], np.float16).tobytes())
    raw = shard[2].read_bytes()  # truncated: cut inside the fourth sample
    cut = _member_offset(shard[2], f"{sample_key(2, 3)}.text.npy") + 40
    shard[2].write_bytes(raw[:cut])
    shard[4].write_bytes(bytes(range(256)) * 16)  # not a tar at all
    return str(prefix)


def test_validate_and_the_loader_agree_on_which_samples_are_bad(corrupted: str,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    index = read_index(corrupted)
    seen: set[str] = set()
    checks = [check_shard(corrupted, entry, index, seen) for entry in index["shards"]]
    by_validate = {(c.name, key) for c in checks for key in c.bad}

    cfg = DataConfig(dataset=corrupted, micro_batch_size=1, num_workers=1, max_corrupt_fraction=1.0,
                     shuffle_buffer=4)
    with caplog.at_level(logging.WARNING, logger="trip.data.loader"):
        delivered = [k for b in LatentLoader(cfg, 0, 1) for k, ok in zip(b["keys"], b["valid"]) if ok]
    by_loader = {(r.args[0], r.args[1]) for r in caplog.records
                 if r.getMessage().startswith("corrupt sample skipped")}

    name = [e["name"] for e in index["shards"]]
    assert by_validate == by_loader == {
        (name[0], sample_key(0, 1)),
        (name[1], sample_key(1, 2)), (name[1], sample_key(1, 4)),
        (name[2], sample_key(2, 3)), (name[2], "#4"), (name[2], "#5"),
        (name[4], "#0"), (name[4], "#1"),
    }
    assert sorted(delivered) == sorted(sample_key(s, i) for s, n in enumerate(SIZES) for i in range(n)
                                       if not {(name[s], sample_key(s, i)), (name[s], f"#{i}")} & by_loader)
    why = {(c.name, k): w for c in checks for k, w in c.bad.items()}
    assert "bad .npy header" in why[(name[0], sample_key(0, 1))]
    assert f"{sample_key(1, 2)}.json: not valid JSON" in why[(name[1], sample_key(1, 2))]
    assert "NaN" in why[(name[1], sample_key(1, 4))]
    assert "truncated" in why[(name[2], "#4")] and "checksum" in why[(name[4], "#0")]

    _, problems = validate_dataset(corrupted)
    assert f"{name[2]}: samples #4..#5 unreadable" in problems
    assert data_tools_main(["validate", corrupted]) == 1
