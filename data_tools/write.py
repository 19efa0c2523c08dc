"""The write stage: one shard's rows -> its committed tar, and the job's progress manifest.

Why a plan: a job on millions of videos will be interrupted. Rows (in CSV order after
filtering) are assigned to shards by position alone, shard i = rows [i*S, (i+1)*S), and
samples inside a shard are written in row order, so a rerun writes byte-identical shards
and skips the ones already committed.

Who writes: the task that decodes a shard's videos also assembles its tar and commits it
straight to the output (`write_shard_samples`: temporary file, then one PUT or rename), and
returns the shard's record (sample count, bytes, channel sums, error lines) to the driver,
so the driver never touches sample bytes.

Progress: the driver appends records to the `Manifest`, `_progress/records-NNNNNN.jsonl`
segments written every few dozen shards (and when the job stops, however it stops). A
rerun discovers what is done from one listing of `_progress/` and the segments it holds
(one read per segment, never one per shard); a shard committed after the last segment was
written is simply done again, with the same bytes. Records from a different job (other
settings, codec, CSV or plan) are refused with an error instead of being mixed in. When the
job finishes, the segments are compacted into `_progress/records.jsonl`, so a resumed job
leaves exactly the files a clean one does.

Buckets: in a multi-shape job (`preprocess.buckets`) a shard's rows go to one tar per
bucket they were decoded for, `<bucket>/shard-NNNNNN.tar`, all numbered by the shard, and
the record lists them all; the rest (plan, row order, resume) is the same.

Finally `errors.jsonl` (videoid, url, stage, reason, status; first the CSV rows the reader
rejected, stage "csv" with their line, then each shard's videos) and `index.json` are
written, index last, each atomically. The CSV is planned again on every run, so a rerun
writes the same manifest as a clean run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from data_tools.webvid import RejectedRow, VideoRow
from trip import storage
from trip.data.shards import ShardInfo, ShardWriter, build_index, shard_name, write_index

PROGRESS_DIR = "_progress"
ERRORS_NAME = "errors.jsonl"
RECORDS_NAME = "records.jsonl"  # the compacted manifest of a finished job
_SEGMENT = "records-"
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
    bucket: str | None = None  # the bucket the clip was decoded for (bucketed jobs)


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


def sample_errors(outcomes: Iterable[Outcome]) -> list[dict[str, Any]]:
    """The errors-manifest lines of a shard's rows that produced no sample, in row order."""
    return [{"videoid": o.row.videoid, "url": o.row.url, "stage": o.stage, "reason": o.reason,
             "status": o.status} for o in outcomes if o.status != "ok"]


def check_sample(o: Outcome, latent_shape: list[int], text_shape: list[int] | None) -> None:
    """Raise ValueError naming the video when its arrays are not what index.json will say."""
    assert o.latents is not None
    if list(o.latents.shape) != list(latent_shape):
        raise ValueError(f"video {o.row.videoid}: latents {list(o.latents.shape)}, expected {list(latent_shape)}")
    if text_shape and (o.text is None or list(o.text.shape) != list(text_shape)):
        raise ValueError(f"video {o.row.videoid}: text states "
                         f"{None if o.text is None else list(o.text.shape)}, expected {list(text_shape)}")


class ShardSamples:
    """The tars of one shard, filled in row order as outcomes arrive, then committed.

    `add(outcome)` for every row of the shard in order (ok ones become samples, the others
    error lines); `commit()` makes the tar visible (none when no row produced a sample) and
    returns the shard's record; `abort()` drops the partial tar.

    Bucketed (`latent_shapes` {bucket: [F, C, h, w]}): every ok outcome names its bucket, and
    each bucket that got samples gets its own tar `<bucket>/shard-NNNNNN.tar` (NNNNNN: this
    shard's number, so names depend on the plan alone); rows arrive in order within each
    bucket, error lines are kept in row order; the record lists each tar's ShardInfo in
    `infos`, in bucket order."""

    def __init__(self, output: str, shard: int, identity: dict[str, str], latent_shape: list[int],
                 text_shape: list[int] | None, latent_shapes: dict[str, list[int]] | None = None) -> None:
        self.output, self.shard, self.identity = output, shard, identity
        self.latent_shape, self.text_shape = latent_shape, text_shape
        self.latent_shapes = latent_shapes
        self._writers: dict[str | None, ShardWriter] = {}
        self._last: dict[str | None, int] = {}
        self._errors: list[tuple[int, dict[str, Any]]] = []

    @property
    def errors(self) -> list[dict[str, Any]]:
        return [e for _, e in sorted(self._errors, key=lambda x: x[0])]

    def add(self, o: Outcome) -> None:
        bucket = o.bucket if self.latent_shapes is not None and o.status == "ok" else None
        last = max(self._last.values(), default=-1) if self.latent_shapes is None else self._last.get(bucket, -1)
        if o.ordinal <= last:
            raise ValueError(f"shard {self.shard}: row {o.ordinal} arrived after row {last}")
        self._last[bucket] = o.ordinal
        if o.status != "ok":
            self._errors += [(o.ordinal, e) for e in sample_errors([o])]
            return
        if self.latent_shapes is None:
            shape = self.latent_shape
        elif bucket in self.latent_shapes:
            shape = self.latent_shapes[bucket]
        else:
            raise ValueError(f"video {o.row.videoid}: bucket {bucket!r} is not one of {list(self.latent_shapes)}")
        check_sample(o, shape, self.text_shape)
        if bucket not in self._writers:
            self._writers[bucket] = ShardWriter(self.output, self.shard, bucket=bucket)
        assert o.latents is not None
        self._writers[bucket].add(sample_key(o.ordinal), o.latents, o.meta or {}, o.row.caption, o.text)

    def commit(self) -> dict[str, Any]:
        if self.latent_shapes is None:
            writer = self._writers.pop(None, None)
            info = writer.commit() if writer is not None else None
            return {**self.identity, "index": self.shard, "shard": shard_name(self.shard),
                    "info": asdict(info) if info else None, "errors": self.errors}
        infos = []
        for bucket in self.latent_shapes:  # config order: the record's bytes depend on the plan only
            writer = self._writers.pop(bucket, None)
            if writer is not None:
                infos.append(asdict(writer.commit()))
        return {**self.identity, "index": self.shard, "shard": shard_name(self.shard, "*"),
                "info": None, "infos": infos, "errors": self.errors}

    def abort(self) -> None:
        for writer in self._writers.values():
            writer.abort()
        self._writers = {}


def record_infos(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The ShardInfo dicts of a shard's record: one per committed tar (none, one, or per bucket)."""
    if "infos" in record:
        return list(record["infos"])
    return [record["info"]] if record.get("info") else []


def write_shard_samples(output: str, shard: int, outcomes: Sequence[Outcome], identity: dict[str, str],
                        latent_shape: list[int], text_shape: list[int] | None,
                        latent_shapes: dict[str, list[int]] | None = None) -> dict[str, Any]:
    """Write and commit one shard from all its outcomes (any order); returns its record."""
    samples = ShardSamples(output, shard, identity, latent_shape, text_shape, latent_shapes)
    try:
        for o in sorted(outcomes, key=lambda o: o.ordinal):
            samples.add(o)
        return samples.commit()
    except BaseException:
        samples.abort()
        raise


class Manifest:
    """The records of an output's committed shards: `_progress/` segments (module docstring).

    `identity` ({fingerprint, plan}) is what every record of this job carries."""

    def __init__(self, output: str, identity: dict[str, str], *, flush_every: int = 64,
                 flush_seconds: float = 30.0) -> None:
        self.output, self.identity = output, identity
        self.flush_every, self.flush_seconds = flush_every, flush_seconds
        self.records: dict[int, str] = {}  # shard -> its record, one JSON line
        self._pending: list[int] = []
        self._files: list[str] = []  # segment names present
        self._next = 0
        self._last_flush = time.monotonic()

    def _url(self, name: str) -> str:
        return storage.join(self.output, PROGRESS_DIR, name)

    def load(self, num_shards: int) -> dict[int, str]:
        """The committed shards' records, from one listing and the segments in it; raises
        `JobMismatchError` on a record of another job."""
        fs, root = storage.filesystem(storage.join(self.output, PROGRESS_DIR))
        fs.invalidate_cache(root)  # a listing cached earlier in this process may be stale
        try:
            names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False))
        except FileNotFoundError:
            names = []
        self._files = [n for n in names if n.endswith(".jsonl") and (n == RECORDS_NAME or n.startswith(_SEGMENT))]
        seqs = [int(n[len(_SEGMENT):-len(".jsonl")]) for n in self._files if n.startswith(_SEGMENT)]
        self._next = max(seqs, default=-1) + 1
        with ThreadPoolExecutor(8) as pool:
            texts = list(pool.map(lambda n: storage.read_bytes(self._url(n)).decode(), self._files))
        for name, text in zip(self._files, texts, strict=True):
            for line in text.splitlines():
                record = json.loads(line)
                if any(record.get(k) != v for k, v in self.identity.items()) or record["index"] >= num_shards:
                    raise JobMismatchError(
                        f"{self._url(name)} lists {record.get('shard')} of a different preprocessing job "
                        f"(other settings, codec, text encoder or CSV rows). Use a new preprocess.output "
                        f"or delete {self.output}")
                self.records[int(record["index"])] = line
        return dict(self.records)

    def add(self, record: dict[str, Any]) -> None:
        """Note a committed shard; written with the next segment (see `maybe_flush`)."""
        self.records[int(record["index"])] = json.dumps(record, sort_keys=True)
        self._pending.append(int(record["index"]))

    def maybe_flush(self) -> None:
        if len(self._pending) >= self.flush_every or (
                self._pending and time.monotonic() - self._last_flush >= self.flush_seconds):
            self.flush()

    def flush(self) -> None:
        """Write the records noted since the last segment as a new segment."""
        self._last_flush = time.monotonic()
        if not self._pending:
            return
        name = f"{_SEGMENT}{self._next:06d}.jsonl"
        body = "".join(self.records[i] + "\n" for i in self._pending)
        storage.write_bytes_atomic(self._url(name), body.encode())
        self._files.append(name)
        self._next += 1
        self._pending = []

    def compact(self) -> None:
        """One `records.jsonl` with every record in shard order; the segments are removed
        after it is written (a crash between leaves both, which `load` reads as one)."""
        self.flush()
        body = "".join(self.records[i] + "\n" for i in sorted(self.records))
        storage.write_bytes_atomic(self._url(RECORDS_NAME), body.encode())
        old = [n for n in self._files if n != RECORDS_NAME]
        fs, _ = storage.filesystem(self.output)
        for name in old:
            _, path = storage.filesystem(self._url(name))
            fs.rm_file(path)
        self._files = [RECORDS_NAME]


def finish(output: str, records: dict[int, str], num_shards: int, *, latent_shape: list[int],
           text_shape: list[int] | None, codec: dict[str, Any], text_encoder: dict[str, Any] | None,
           extra: dict[str, Any], num_rows: int, rejected: Sequence[RejectedRow] = (),
           csv_url: str = "", buckets: Sequence[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Write errors.jsonl (the `rejected` CSV rows of `csv_url`, then every shard's errors)
    and then index.json, from every shard's record (JSON lines, by shard). `buckets`: a
    bucketed job's [{name, height, width, frames, latent_shape}], every one listed in
    index.json (with its sample and shard counts, 0 for a bucket no clip went to)."""
    missing = [i for i in range(num_shards) if i not in records]
    if missing:
        raise ValueError(f"cannot finish {output}: shards {missing[:5]} are not committed")
    lines = [json.dumps({"videoid": r.videoid, "url": "", "stage": "csv", "status": "skipped", "csv": csv_url,
                         "line": r.line, "reason": f"line {r.line} {r.reason}"}, sort_keys=True) for r in rejected]
    infos = []
    for i in range(num_shards):
        record = json.loads(records[i])
        lines += [json.dumps(e, sort_keys=True) for e in record["errors"]]
        infos += [ShardInfo(**info) for info in record_infos(record)]
    storage.write_bytes_atomic(storage.join(output, ERRORS_NAME), "".join(e + "\n" for e in lines).encode())
    index = build_index(infos, latent_shape=latent_shape, text_shape=text_shape, codec=codec,
                        text_encoder=text_encoder, buckets=buckets,
                        extra={**extra, "num_rows": num_rows, "num_errors": len(lines),
                               "num_rejected_rows": len(rejected), "errors_manifest": ERRORS_NAME})
    write_index(output, index)
    return index
