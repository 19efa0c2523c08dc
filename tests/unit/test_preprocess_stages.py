"""The job's Ray Data stage functions on their own: rows in, rows out, failures as data."""

from __future__ import annotations

import io
import json

import numpy as np

from data_tools.decode import SamplingSpec
from data_tools.shards import npy_bytes
from data_tools.synth import write_video
from pipelines.preprocess import EncodeActor, decode_row
from trip.config import CodecConfig

SPEC = SamplingSpec(num_frames=2, fps=8.0, resolution=16)


def _item(i: int, url: str) -> dict:
    return {"ordinal": i, "shard": 0, "videoid": str(i), "url": url, "caption": f"clip {i}"}


def _batch(rows: list[dict]) -> dict[str, np.ndarray]:
    return {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}


def test_decode_row_reports_skips_and_passes_clips(tmp_path) -> None:
    path = write_video(np.zeros((4, 16, 16, 3), np.uint8), str(tmp_path / "v.mp4"))
    good = decode_row(_item(0, path), SPEC)
    assert good["status"] == "ok" and good["videoid"] == "0"
    assert np.load(io.BytesIO(good["frames"]), allow_pickle=False).shape == (2, 16, 16, 3)
    gone = decode_row(_item(1, str(tmp_path / "gone.mp4")), SPEC)
    assert (gone["status"], gone["stage"], gone["frames"]) == ("skipped", "fetch", b"")
    odd = decode_row({**_item(2, path), "url": None}, SPEC)  # a bug, not bad input
    assert odd["status"] == "error" and odd["stage"] == "decode" and "AttributeError" in odd["reason"]


def test_decode_row_looks_for_other_extensions_when_told(tmp_path) -> None:
    found = write_video(np.zeros((4, 16, 16, 3), np.uint8), str(tmp_path / "v.mkv"))
    guess = str(tmp_path / "v.mp4")
    assert decode_row(_item(0, guess), SPEC)["stage"] == "fetch"
    row = decode_row(_item(0, guess), SPEC, other_exts=True)
    assert row["status"] == "ok" and json.loads(row["meta"])["source_url"] == found
    gone = decode_row(_item(1, str(tmp_path / "gone.mp4")), SPEC, other_exts=True)
    assert gone["stage"] == "fetch" and "gone.m4v" in gone["reason"]


def test_encode_actor_encodes_ok_rows_and_turns_failures_into_error_rows() -> None:
    actor = EncodeActor(CodecConfig(kind="lossless", downscale=2), None, 8, 4)
    frames = np.zeros((2, 16, 16, 3), np.uint8)
    rows = [{**_item(0, "a"), "status": "ok", "stage": "", "reason": "", "frames": npy_bytes(frames),
             "meta": "{}"},
            {**_item(1, "b"), "status": "skipped", "stage": "fetch", "reason": "file not found",
             "frames": b"", "meta": "{}"}]
    out = actor(_batch(rows))
    assert "frames" not in out and list(out["status"]) == ["ok", "skipped"]
    assert np.load(io.BytesIO(out["latents"][0]), allow_pickle=False).shape == (2, 12, 8, 8)
    assert out["latents"][1] == b"" and out["reason"][1] == "file not found"
    # frames the codec cannot take (15 px is not divisible by 2): the batch's ok rows become errors
    rows[0]["frames"] = npy_bytes(np.zeros((2, 15, 15, 3), np.uint8))
    out = actor(_batch(rows))
    assert list(out["status"]) == ["error", "skipped"] and out["stage"][0] == "encode"
    assert "divisible" in out["reason"][0]
