"""The write stage: rows -> shard plan, one committed shard at a time, then index + errors.

Why a plan: a job on millions of videos will be interrupted. Rows (in CSV order after
filtering) are assigned to shards by position alone, shard i = rows [i*S, (i+1)*S), and
samples inside a shard are written in row order, so a rerun writes byte-identical shards
and skips the ones already committed.

A shard is done when its record `_progress/shard-NNNNNN.json` exists. The record is
written after the tar is committed, and holds what index.json and the errors manifest
need (sample count, bytes, channel sums, error lines) so finishing never re-reads shards.
A crash between tar and record only costs redoing that shard (same bytes again).
A record made by a different job (other settings, codec or rows) is refused with an
error instead of being mixed in.

Finally `errors.jsonl` (videoid, url, stage, reason, status; first the CSV rows the reader
rejected, stage "csv" with their line, then each shard's videos) and `index.json` are
written, index last, each atomically. The CSV rows are read again on every run, so a rerun
writes the same manifest as a clean run.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from data_tools.shards import ShardInfo, ShardWriter, build_index, shard_name, write_index
from data_tools.webvid import RejectedRow, VideoRow
from trip import storage

PROGRESS_DIR = "_progress"
ERRORS_NAME = "errors.jsonl"
_TAR_BLOCK = 512


class JobMismatchError(RuntimeError):
    """The output prefix holds shards from a job with other settings or rows."""


@dataclass
class Outcome:
    """One row's result arriving at the writer."""

    ordinal: int
    row: VideoRow
    status: str  # ok | skipped | error
    stage: str = ""
    reason: str = ""
    latents: np.ndarray | None = None  # float16 [F, C, h, w]
    text: np.ndarray | None = None  # float16 [L, D]
    meta: dict[str, Any] | None = None


def sample_key(ordinal: int) -> str:
    """Keys are row positions: stable across reruns and free of '.' and '/'."""
    return f"{ordinal:09d}"


def estimate_sample_bytes(latent_shape: list[int], text_shape: list[int] | None) -> int:
    """Tar bytes of one sample: float16 arrays + ~1.5 KiB of json/caption + headers."""
    def member(n: int) -> int:
        return _TAR_BLOCK + -(-n // _TAR_BLOCK) * _TAR_BLOCK

    size = member(128 + 2 * int(np.prod(latent_shape))) + member(1024) + member(256)
    if text_shape:
        size += member(128 + 2 * int(np.prod(text_shape)))
    return size


def rows_per_shard(samples_per_shard: int, max_shard_bytes: int | None, sample_bytes: int) -> int:
    """Rows per shard: the sample target, lowered so that a full shard fits the byte target."""
    if not max_shard_bytes:
        return samples_per_shard
    return max(1, min(samples_per_shard, max_shard_bytes // sample_bytes))


def plan(rows: list[VideoRow], per_shard: int) -> list[list[int]]:
    """Row ordinals of each shard: shard i gets rows [i*S, (i+1)*S)."""
    return [list(range(s, min(s + per_shard, len(rows)))) for s in range(0, len(rows), per_shard)]


def _rows_digest(rows: list[VideoRow], ordinals: list[int]) -> str:
    h = hashlib.sha256()
    for i in ordinals:
        h.update(json.dumps([i, rows[i].videoid, rows[i].caption]).encode())
    return h.hexdigest()[:16]


def record_url(output: str, shard: int) -> str:
    return storage.join(output, PROGRESS_DIR, shard_name(shard).replace(".tar", ".json"))


class ShardPlanWriter:
    """Commits shards of a fixed plan under `output` and finishes the dataset."""

    def __init__(self, output: str, rows: list[VideoRow], per_shard: int, *, fingerprint: str,
                 latent_shape: list[int], text_shape: list[int] | None) -> None:
        self.output = output
        self.rows = rows
        self.shards = plan(rows, per_shard)
        self.fingerprint = fingerprint
        self.latent_shape = latent_shape
        self.text_shape = text_shape

    def _expected_record(self, shard: int) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "rows": _rows_digest(self.rows, self.shards[shard])}

    def committed(self) -> dict[int, dict[str, Any]]:
        """Records of shards already committed by this same job; raises on a foreign one."""
        fs, root = storage.filesystem(storage.join(self.output, PROGRESS_DIR))
        fs.invalidate_cache(root)  # a listing cached earlier in this process may be stale
        try:
            names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False))
        except FileNotFoundError:
            return {}
        done: dict[int, dict[str, Any]] = {}
        for name in names:
            if not (name.startswith("shard-") and name.endswith(".json")):
                continue
            shard = int(name[len("shard-"):-len(".json")])
            url = record_url(self.output, shard)
            record = json.loads(storage.read_bytes(url))
            if shard >= len(self.shards) or any(
                    record.get(k) != v for k, v in self._expected_record(shard).items()):
                raise JobMismatchError(
                    f"{url} was written by a different preprocessing job (other settings, codec, "
                    f"text encoder or CSV rows). Use a new preprocess.output or delete {self.output}")
            done[shard] = record
        return done

    def commit(self, shard: int, outcomes: list[Outcome]) -> dict[str, Any]:
        """Write the shard's ok samples (row order) and its record; returns the record."""
        outcomes = sorted(outcomes, key=lambda o: o.ordinal)
        if [o.ordinal for o in outcomes] != self.shards[shard]:
            raise ValueError(f"shard {shard}: got rows {[o.ordinal for o in outcomes]}, "
                             f"planned {self.shards[shard]}")
        ok = [o for o in outcomes if o.status == "ok"]
        info: ShardInfo | None = None
        if ok:  # a shard whose every row failed is recorded but has no tar
            writer = ShardWriter(self.output, shard)
            try:
                for o in ok:
                    self._add(writer, o)
            except BaseException:
                writer.abort()
                raise
            info = writer.commit()
        errors = [{"videoid": o.row.videoid, "url": o.row.url, "stage": o.stage, "reason": o.reason,
                   "status": o.status} for o in outcomes if o.status != "ok"]
        record = {**self._expected_record(shard), "shard": shard_name(shard),
                  "info": asdict(info) if info else None, "errors": errors}
        storage.write_bytes_atomic(record_url(self.output, shard),
                                   json.dumps(record, sort_keys=True).encode())
        return record

    def _add(self, writer: ShardWriter, o: Outcome) -> None:
        assert o.latents is not None
        if list(o.latents.shape) != self.latent_shape:
            raise ValueError(f"video {o.row.videoid}: latents {list(o.latents.shape)}, "
                             f"expected {self.latent_shape}")
        if self.text_shape and (o.text is None or list(o.text.shape) != self.text_shape):
            raise ValueError(f"video {o.row.videoid}: text states "
                             f"{None if o.text is None else list(o.text.shape)}, expected {self.text_shape}")
        writer.add(sample_key(o.ordinal), o.latents, o.meta or {}, o.row.caption, o.text)

    def finish(self, records: dict[int, dict[str, Any]], *, codec: dict[str, Any],
               text_encoder: dict[str, Any] | None, extra: dict[str, Any],
               rejected: Sequence[RejectedRow] = (), csv_url: str = "") -> dict[str, Any]:
        """Write errors.jsonl (the `rejected` CSV rows of `csv_url`, then every shard's
        errors) and then index.json from every shard's record."""
        missing = [i for i in range(len(self.shards)) if i not in records]
        if missing:
            raise ValueError(f"cannot finish {self.output}: shards {missing[:5]} are not committed")
        ordered = [records[i] for i in range(len(self.shards))]
        errors = [{"videoid": r.videoid, "url": "", "stage": "csv", "status": "skipped", "csv": csv_url,
                   "line": r.line, "reason": f"line {r.line} {r.reason}"} for r in rejected]
        errors += [e for r in ordered for e in r["errors"]]
        storage.write_bytes_atomic(storage.join(self.output, ERRORS_NAME),
                                   "".join(json.dumps(e, sort_keys=True) + "\n" for e in errors).encode())
        infos = [ShardInfo(**r["info"]) for r in ordered if r["info"]]
        index = build_index(infos, latent_shape=self.latent_shape, text_shape=self.text_shape,
                            codec=codec, text_encoder=text_encoder,
                            extra={**extra, "num_rows": len(self.rows), "num_errors": len(errors),
                                   "num_rejected_rows": len(rejected), "errors_manifest": ERRORS_NAME})
        write_index(self.output, index)
        return index
