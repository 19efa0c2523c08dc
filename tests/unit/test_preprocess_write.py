"""The write stage: shards committed from outcomes, the progress manifest, index + errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from data_tools.webvid import RejectedRow, VideoRow
from data_tools.write import (
    ERRORS_NAME,
    PROGRESS_DIR,
    RECORDS_NAME,
    JobMismatchError,
    Manifest,
    Outcome,
    ShardSamples,
    estimate_sample_bytes,
    finish,
    rows_per_shard,
    write_shard_samples,
)
from trip.data.shards import read_index, read_shard

SHAPE = [2, 3, 2, 2]
IDENTITY = {"fingerprint": "fp", "plan": "p1"}


def _rows(n: int) -> list[VideoRow]:
    return [VideoRow(videoid=str(i), url=f"/v/{i}.mp4", caption=f"cap {i}", duration=4.0,
                     page_dir="d", extra="{}") for i in range(n)]


def _outcome(rows: list[VideoRow], i: int, bad: bool = False) -> Outcome:
    if bad:
        return Outcome(i, rows[i], "skipped", "decode", "too short")
    lat = np.full(SHAPE, i, np.float16)
    return Outcome(i, rows[i], "ok", latents=lat, meta={"videoid": rows[i].videoid})


def _commit(out: str, shard: int, outcomes: list[Outcome], identity: dict = IDENTITY) -> dict:
    return write_shard_samples(out, shard, outcomes, identity, SHAPE, None)


def test_rows_per_shard_respects_the_byte_target() -> None:
    per_sample = estimate_sample_bytes([16, 4, 32, 32], [77, 1024])
    assert per_sample > 2 * 16 * 4 * 32 * 32 + 2 * 77 * 1024
    assert rows_per_shard(1000, None, per_sample) == 1000
    assert rows_per_shard(1000, 10 * per_sample + 5, per_sample) == 10
    assert rows_per_shard(1000, 1, per_sample) == 1


def test_shards_records_manifest_and_finish(tmp_path) -> None:
    out, rows = str(tmp_path / "ds"), _rows(5)
    manifest = Manifest(out, IDENTITY, flush_every=2)
    assert manifest.load(3) == {}
    manifest.add(_commit(out, 1, [_outcome(rows, 3), _outcome(rows, 2, bad=True)]))  # any arrival order
    manifest.maybe_flush()  # 1 record < flush_every: nothing written yet
    assert not os.path.exists(os.path.join(out, PROGRESS_DIR))
    manifest.flush()
    # a rerun discovers the committed shard from the manifest's one listing
    again = Manifest(out, IDENTITY, flush_every=2)
    assert set(again.load(3)) == {1}
    again.add(_commit(out, 0, [_outcome(rows, 0), _outcome(rows, 1)]))
    again.add(_commit(out, 2, [_outcome(rows, 4, bad=True)]))  # every row failed: no tar
    again.maybe_flush()  # 2 records: a second segment
    assert sorted(os.listdir(os.path.join(out, PROGRESS_DIR))) == ["records-000000.jsonl", "records-000001.jsonl"]
    assert not os.path.exists(os.path.join(out, "shard-000002.tar"))
    index = finish(out, again.records, 3, latent_shape=SHAPE, text_shape=None,
                   codec={"kind": "lossless", "scaling_factor": 1.0}, text_encoder=None,
                   extra={"sampling": {}}, num_rows=5, csv_url="/in/results.csv",
                   rejected=[RejectedRow(7, "3", "repeats videoid 3 (first on line 5)")])
    again.compact()
    assert os.listdir(os.path.join(out, PROGRESS_DIR)) == [RECORDS_NAME]
    assert set(Manifest(out, IDENTITY).load(3)) == {0, 1, 2}  # the compacted manifest reads the same
    assert index == read_index(out)
    assert [s["name"] for s in index["shards"]] == ["shard-000000.tar", "shard-000001.tar"]
    assert index["num_samples"] == 3 and index["num_rows"] == 5 and index["num_errors"] == 3
    assert index["num_rejected_rows"] == 1
    assert read_shard(os.path.join(out, "shard-000001.tar")).keys == ["000000003"]
    with open(os.path.join(out, ERRORS_NAME)) as f:
        errors = [json.loads(line) for line in f]
    assert [(e["videoid"], e["stage"], e["reason"]) for e in errors] == [
        ("3", "csv", "line 7 repeats videoid 3 (first on line 5)"),
        ("2", "decode", "too short"), ("4", "decode", "too short")]
    assert (errors[0]["csv"], errors[0]["line"]) == ("/in/results.csv", 7)
    # mean over channels of latents filled with 0, 1, 3
    np.testing.assert_allclose(index["latent_mean"], [4 / 3] * 3)


def test_a_shard_is_written_the_same_whoever_writes_it(tmp_path) -> None:
    """The rerun guarantee rests on this: a shard's bytes depend on its rows only."""
    rows = _rows(3)
    for name in ("a", "b"):
        _commit(str(tmp_path / name), 0, [_outcome(rows, i) for i in (2, 0, 1)][:: 1 if name == "a" else -1])
    with open(tmp_path / "a" / "shard-000000.tar", "rb") as fa, open(tmp_path / "b" / "shard-000000.tar", "rb") as fb:
        assert fa.read() == fb.read()


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
    manifest = Manifest(out, IDENTITY)
    manifest.add(_commit(out, 0, [_outcome(rows, 0), _outcome(rows, 1)]))
    manifest.flush()
    with pytest.raises(JobMismatchError, match="different preprocessing job"):
        Manifest(out, {**IDENTITY, "fingerprint": "other"}).load(2)
    with pytest.raises(JobMismatchError, match="records-000000.jsonl lists shard-000000.tar"):
        Manifest(out, {**IDENTITY, "plan": "rows reordered"}).load(2)


def test_samples_are_checked_and_a_failed_shard_leaves_nothing(tmp_path) -> None:
    out, rows = str(tmp_path / "ds"), _rows(4)
    wrong = _outcome(rows, 1)
    wrong.latents = np.zeros([2, 3, 4, 4], np.float16)
    with pytest.raises(ValueError, match="video 1: latents"):
        _commit(out, 0, [_outcome(rows, 0), wrong])
    assert not os.path.exists(out) or os.listdir(out) == []
    samples = ShardSamples(out, 0, IDENTITY, SHAPE, None)
    samples.add(_outcome(rows, 1))
    with pytest.raises(ValueError, match="row 0 arrived after row 1"):
        samples.add(_outcome(rows, 0))
    samples.abort()
    with pytest.raises(ValueError, match="not committed"):
        finish(out, {}, 1, latent_shape=SHAPE, text_shape=None, codec={}, text_encoder=None, extra={}, num_rows=4)
