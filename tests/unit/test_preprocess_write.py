"""The write stage: shard plan, committed records, foreign records refused, index + errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from data_tools.shards import read_index, read_shard
from data_tools.webvid import RejectedRow, VideoRow
from data_tools.write import (
    ERRORS_NAME,
    JobMismatchError,
    Outcome,
    ShardPlanWriter,
    estimate_sample_bytes,
    plan,
    rows_per_shard,
)

SHAPE = [2, 3, 2, 2]


def _rows(n: int) -> list[VideoRow]:
    return [VideoRow(videoid=str(i), url=f"/v/{i}.mp4", caption=f"cap {i}", duration=4.0,
                     page_dir="d", extra="{}") for i in range(n)]


def _outcome(rows: list[VideoRow], i: int, bad: bool = False) -> Outcome:
    if bad:
        return Outcome(i, rows[i], "skipped", "decode", "too short")
    lat = np.full(SHAPE, i, np.float16)
    return Outcome(i, rows[i], "ok", latents=lat, meta={"videoid": rows[i].videoid})


def _writer(out: str, rows: list[VideoRow], fingerprint: str = "fp") -> ShardPlanWriter:
    return ShardPlanWriter(out, rows, 2, fingerprint=fingerprint, latent_shape=SHAPE, text_shape=None)


def test_plan_is_positional() -> None:
    assert plan(_rows(5), 2) == [[0, 1], [2, 3], [4]]
    assert plan([], 2) == []


def test_rows_per_shard_respects_the_byte_target() -> None:
    per_sample = estimate_sample_bytes([16, 4, 32, 32], [77, 1024])
    assert per_sample > 2 * 16 * 4 * 32 * 32 + 2 * 77 * 1024
    assert rows_per_shard(1000, None, per_sample) == 1000
    assert rows_per_shard(1000, 10 * per_sample + 5, per_sample) == 10
    assert rows_per_shard(1000, 1, per_sample) == 1


def test_commit_resume_and_finish(tmp_path) -> None:
    out, rows = str(tmp_path / "ds"), _rows(5)
    w = _writer(out, rows)
    w.commit(1, [_outcome(rows, 3), _outcome(rows, 2, bad=True)])  # order of arrival is free
    assert set(w.committed()) == {1}
    # a new writer (a rerun) sees the same committed shard
    w2 = _writer(out, rows)
    records = w2.committed()
    records[0] = w2.commit(0, [_outcome(rows, 0), _outcome(rows, 1)])
    records[2] = w2.commit(2, [_outcome(rows, 4, bad=True)])  # every row failed: no tar
    assert not os.path.exists(os.path.join(out, "shard-000002.tar"))
    index = w2.finish(records, codec={"kind": "lossless", "scaling_factor": 1.0}, text_encoder=None,
                      extra={"sampling": {}}, csv_url="/in/results.csv",
                      rejected=[RejectedRow(7, "3", "repeats videoid 3 (first on line 5)")])
    assert index == read_index(out)
    assert [s["name"] for s in index["shards"]] == ["shard-000000.tar", "shard-000001.tar"]
    assert index["num_samples"] == 3 and index["num_rows"] == 5 and index["num_errors"] == 3
    assert index["num_rejected_rows"] == 1
    samples = read_shard(os.path.join(out, "shard-000001.tar"))
    assert [s["__key__"] for s in samples] == ["000000003"]
    with open(os.path.join(out, ERRORS_NAME)) as f:
        errors = [json.loads(line) for line in f]
    assert [(e["videoid"], e["stage"], e["reason"]) for e in errors] == [
        ("3", "csv", "line 7 repeats videoid 3 (first on line 5)"),
        ("2", "decode", "too short"), ("4", "decode", "too short")]
    assert (errors[0]["csv"], errors[0]["line"]) == ("/in/results.csv", 7)
    # mean over channels of latents filled with 0, 1, 3
    np.testing.assert_allclose(index["latent_mean"], [4 / 3] * 3)


def test_jobs_started_before_strict_csv_and_ext_keep_their_fingerprint() -> None:
    """A job started with the old default template resumes when that template is set
    explicitly: the value is what the code before `strict_csv` and `{ext}` computed."""
    from pipelines.preprocess import _fingerprint
    from trip.config import PreprocessConfig

    old = PreprocessConfig(csv="a.csv", output="o", path_template="{page_dir}/{videoid}.mp4")
    assert _fingerprint(old, {"kind": "lossless"}, None, 64) == "8afe52a36275d13d"
    strict = PreprocessConfig(csv="a.csv", output="o", path_template=old.path_template, strict_csv=True)
    assert _fingerprint(strict, {"kind": "lossless"}, None, 64) == "8afe52a36275d13d"


def test_records_of_another_job_are_refused(tmp_path) -> None:
    out, rows = str(tmp_path / "ds"), _rows(4)
    _writer(out, rows).commit(0, [_outcome(rows, 0), _outcome(rows, 1)])
    with pytest.raises(JobMismatchError, match="different preprocessing job"):
        _writer(out, rows, fingerprint="other").committed()
    changed = [rows[1], rows[0], *rows[2:]]  # CSV rows reordered
    with pytest.raises(JobMismatchError, match="shard-000000.json"):
        _writer(out, changed).committed()


def test_commit_checks_rows_and_shapes(tmp_path) -> None:
    out, rows = str(tmp_path / "ds"), _rows(4)
    w = _writer(out, rows)
    with pytest.raises(ValueError, match="planned"):
        w.commit(0, [_outcome(rows, 0)])
    wrong = _outcome(rows, 1)
    wrong.latents = np.zeros([2, 3, 4, 4], np.float16)
    with pytest.raises(ValueError, match="video 1: latents"):
        w.commit(0, [_outcome(rows, 0), wrong])
    assert w.committed() == {} and not os.path.exists(os.path.join(out, "shard-000000.tar"))
    with pytest.raises(ValueError, match="not committed"):
        w.finish({}, codec={}, text_encoder=None, extra={})
