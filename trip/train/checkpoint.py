"""Training checkpoints: one component owns their layout, writing, discovery, loading and retention.

Layout, under the run directory `<run.storage_path>/<run.name>` (any fsspec URL or local path):

    checkpoints/step-000001000/
        ds/...                                  DeepSpeed's ZeRO files; each rank's carry its rank
        weights/rank-00003-of-00512.safetensors rank 3's partitions of the parameters
        ema/rank-00003-of-00512.safetensors     rank 3's partitions of their EMA
        trip_checkpoint.json                    the commit record, written last (see below)
        universal/, universal.json              DeepSpeed's universal checkpoint, made once, by the
                                                first resume at another world size
    history/step-000001000.jsonl                per-step loss/throughput rows up to that checkpoint
    validation/step-000001000/result.json       that checkpoint's validation figures, written last
                                                (beside its sample videos; `trip.train.validation`)
    summary.json, training.png                  end-of-run report

Why it is shaped like this, at 512 ranks:
- Each rank writes only its own files and, resuming at the same world size, reads back only
  its own ZeRO files and EMA slice plus the record: no rank ever moves the whole model.
- The weights and EMA are saved as per-rank partitions (`trip.train.partitions`); `trip
  export` consolidates them offline. A resume at another world size reads, per rank, the
  two or three old EMA files overlapping its new slice, and the ZeRO state through one
  universal conversion stored next to the checkpoint, reused by every later resize.
- Writing is asynchronous (`CheckpointWriter`): the training step only waits for the local
  files; a background thread uploads them. Rank 0 commits by writing the record once every
  file listed in it is in storage, as the last write of the checkpoint. Until then the
  checkpoint does not exist for readers, so a crash mid-upload leaves the previous one as
  the one to resume from.
- Completeness is one listing of the checkpoint and a set lookup per file: O(files).
- Discovery, retention and the record live here; the loop, the driver and `trip export`
  all go through `RunDir`, one filesystem abstraction (fsspec). Ray sees a pyarrow
  filesystem only at its own boundary (`ray_storage`).

Nothing of ours is unpickled from storage: records are JSON, tensors are safetensors.
DeepSpeed reads its own ZeRO files (torch.load) only from the run's storage, which the run
itself wrote.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trip import storage

log = logging.getLogger(__name__)

FORMAT = "trip-checkpoint/2"
RECORD = "trip_checkpoint.json"
DS_TAG = "ds"
UNIVERSAL = "universal"
UNIVERSAL_RECORD = "universal.json"
_STEP_DIR = re.compile(r"^step-(\d{9})$")
_RANK_FILE = re.compile(r"zero_pp_rank_(\d+)_")


def step_name(step: int) -> str:
    return f"step-{step:09d}"


def partition_file(kind: str, rank: int, world: int) -> str:
    """Relative path of a rank's partition file of `kind` ("weights" or "ema")."""
    return f"{kind}/rank-{rank:05d}-of-{world:05d}.safetensors"


def missing_files(expected: dict[str, int], present: dict[str, int]) -> list[str]:
    """Files of `expected` (relative path -> size) absent from `present` or of another size.

    A dict lookup per file: O(files), whatever the world size."""
    return [p for p, size in expected.items() if present.get(p) != size]


def ds_rank(rel: str) -> int | None:
    """The rank a DeepSpeed file belongs to (its `zero_pp_rank_<r>_`), None for shared files."""
    m = _RANK_FILE.search(rel.rsplit("/", 1)[-1])
    return int(m.group(1)) if m else None


def local_listing(root: str) -> dict[str, int]:
    """Relative path ('/'-separated) -> size of every file under a local directory."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            full = os.path.join(dirpath, f)
            out[os.path.relpath(full, root).replace(os.sep, "/")] = os.path.getsize(full)
    return out


def write_json(path: str, obj: Any) -> None:
    """Write JSON to a local file atomically (rename), creating parent dirs."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(obj, fh)
    os.replace(tmp, path)


@dataclass(frozen=True)
class Found:
    """A complete checkpoint: its step, URL and commit record."""

    step: int
    url: str
    record: dict[str, Any]


class RunDir:
    """A run's directory in storage: checkpoints, history and report, through fsspec."""

    def __init__(self, storage_path: str, name: str, validate_every: int = 0) -> None:
        self.validate_every = validate_every  # retention keeps these steps until validated
        self.url = storage.join(storage_path, name)
        self.fs, self.path = storage.filesystem(self.url)
        self.local = storage.local_path(self.url) is not None

    @classmethod
    def of_checkpoint(cls, url: str) -> tuple[RunDir, int | None]:
        """(run dir, step) of a checkpoint URL `<run>/checkpoints/step-N`, or (run dir, None)
        when `url` is the run directory itself."""
        parts = url.rstrip("/").rsplit("/", 2)
        m = _STEP_DIR.match(parts[-1]) if len(parts) == 3 and parts[1] == "checkpoints" else None
        base = parts[0] if m else url.rstrip("/")
        parent, _, name = base.rpartition("/")
        return cls(parent or ".", name), (int(m.group(1)) if m else None)

    # ------------------------------------------------------------------ paths
    def checkpoint_url(self, step: int) -> str:
        return storage.join(self.url, "checkpoints", step_name(step))

    def validation_url(self, step: int) -> str:
        return storage.join(self.url, "validation", step_name(step))

    def validated(self, step: int) -> bool:
        """True once the validation of `step` is complete (its result is written last)."""
        from trip.train.validation import RESULT

        return storage.exists(storage.join(self.validation_url(step), RESULT))

    def latest_validation(self, at_most: int | None = None) -> tuple[int, dict[str, Any]] | None:
        """(step, figures) of the newest complete validation (optionally at or before step
        `at_most`): its `result.json`, written last. None when the run recorded none."""
        from trip.train.validation import RESULT

        steps = self._step_dirs("validation")
        for step in reversed([s for s in steps if at_most is None or s <= at_most]):
            try:
                return step, json.loads(storage.read_bytes(storage.join(self.validation_url(step), RESULT)))
            except FileNotFoundError:
                continue  # under way, or cut off before its result: not a validation yet
        return None

    def awaiting_validation(self, step: int) -> bool:
        return bool(self.validate_every) and step % self.validate_every == 0 and not self.validated(step)

    def _p(self, *parts: str) -> str:
        return "/".join([self.path.rstrip("/"), *[p.strip("/") for p in parts]])

    # ------------------------------------------------------------------ listing
    def listing(self, step: int, sub: str = "") -> dict[str, int]:
        """Relative path -> size of every file of a checkpoint (one recursive listing)."""
        root = self._p("checkpoints", step_name(step), sub) if sub else self._p("checkpoints", step_name(step))
        self.fs.invalidate_cache()
        try:
            found = self.fs.find(root, detail=True)
        except FileNotFoundError:
            return {}
        n = len(root.rstrip("/")) + 1
        return {p[n:]: int(info.get("size") or 0) for p, info in found.items() if info.get("type") != "directory"}

    def steps(self) -> list[int]:
        """Steps of every checkpoint directory (complete or not), oldest first."""
        return self._step_dirs("checkpoints")

    def _step_dirs(self, folder: str) -> list[int]:
        """Steps of the `step-N` directories under `folder` of the run, oldest first (fresh listing)."""
        self.fs.invalidate_cache()
        try:
            entries = self.fs.ls(self._p(folder), detail=False)
        except FileNotFoundError:
            return []
        out = []
        for e in entries:
            m = _STEP_DIR.match(e.rstrip("/").rsplit("/", 1)[-1])
            if m:
                out.append(int(m.group(1)))
        return sorted(out)

    def record(self, step: int) -> dict[str, Any] | None:
        url = storage.join(self.checkpoint_url(step), RECORD)
        try:
            return json.loads(storage.read_bytes(url))
        except FileNotFoundError:
            return None

    def check(self, step: int) -> tuple[dict[str, Any] | None, str]:
        """(record, "ok") when the checkpoint at `step` is complete, else (None, why)."""
        rec = self.record(step)
        if rec is None:
            return None, f"no {RECORD} (never committed)"
        if rec.get("format") != FORMAT:
            return None, f"format {rec.get('format')!r} is not {FORMAT}"
        missing = missing_files(rec["files"], self.listing(step))
        if missing:
            return None, f"{len(missing)} files missing or short, e.g. {missing[:3]}"
        return rec, "ok"

    def latest(self, at_most: int | None = None) -> Found | None:
        """The newest complete checkpoint (optionally at or before step `at_most`), or None.

        Torn checkpoints (a crash before the commit, a file lost later) are skipped with a
        log line naming what is missing."""
        for step in reversed(self.steps()):
            if at_most is not None and step > at_most:
                continue
            rec, why = self.check(step)
            if rec is not None:
                return Found(step, self.checkpoint_url(step), rec)
            log.warning("checkpoint %s is not usable: %s", self.checkpoint_url(step), why)
        return None

    # ------------------------------------------------------------------ reading
    def download(self, step: int, rels: Iterable[str], dest: str) -> int:
        """Fetch the given files of a checkpoint into `dest` (same relative paths); returns bytes."""
        total = 0
        rels = list(rels)

        def one(rel: str) -> int:
            src, out = self._p("checkpoints", step_name(step), rel), os.path.join(dest, rel)
            os.makedirs(os.path.dirname(out), exist_ok=True)
            storage.retry(lambda: self.fs.get_file(src, out), what=f"downloading {rel}")
            return os.path.getsize(out)

        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(8, len(rels)))) as pool:
            for n in pool.map(one, rels):
                total += n
        return total

    # ------------------------------------------------------------------ writing
    def put(self, local: str, rel: str) -> None:
        """Upload one local file so that readers see it whole or not at all."""
        target = self._p(rel)
        if self.local:  # a plain copy is visible while it grows: copy aside, then rename
            os.makedirs(os.path.dirname(target), exist_ok=True)
            tmp = f"{target}.partial-{os.getpid()}"
            shutil.copyfile(local, tmp)
            os.replace(tmp, target)
            return
        # one PUT (or a completed multipart upload) is atomic in object storage
        storage.retry(lambda: self.fs.put_file(local, target), what=f"uploading {rel}")

    def write_bytes(self, rel: str, data: bytes) -> None:
        storage.retry(lambda: storage.write_bytes_atomic(storage.join(self.url, rel), data), what=f"writing {rel}")

    def remove_checkpoint(self, step: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self._p("checkpoints", step_name(step)), recursive=True)

    def retain(self, keep: int, protect: int | None = None) -> list[int]:
        """Delete all but the `keep` newest complete checkpoints, and torn ones older than the
        newest complete one; never `protect` (a checkpoint still being read) nor a complete
        checkpoint still awaiting its validation. Returns steps removed."""
        complete = [s for s in self.steps() if self.check(s)[0] is not None]
        if not complete:
            return []
        keep_set = set(complete[-keep:]) | ({protect} if protect is not None else set())
        keep_set |= {s for s in complete[:-keep] if self.awaiting_validation(s)}
        gone = [s for s in self.steps() if s not in keep_set and s < complete[-1]]
        for s in gone:
            self.remove_checkpoint(s)
        return gone

    # ------------------------------------------------------------------ history
    def write_history(self, step: int, rows: list[dict[str, Any]]) -> None:
        """One append-only segment per checkpoint: the rows since the previous one."""
        body = "".join(json.dumps(r) + "\n" for r in rows).encode()
        self.write_bytes(f"history/{step_name(step)}.jsonl", body)

    def history(self, up_to: int | None = None) -> list[dict[str, Any]]:
        """Every row of the run up to step `up_to`. A segment is written just before its
        checkpoint's commit, so an attempt that died then leaves rows of steps the next
        attempt trains again: per step the newest row (by its `time`) wins."""
        self.fs.invalidate_cache()
        try:
            names = sorted(self.fs.ls(self._p("history"), detail=False))
        except FileNotFoundError:
            return []
        rows: dict[int, dict[str, Any]] = {}
        for n in names:
            if not n.endswith(".jsonl"):
                continue
            for line in self.fs.cat_file(n).decode().splitlines():
                if line.strip():
                    r = json.loads(line)
                    old = rows.get(int(r["step"]))
                    if old is None or r.get("time", 0) >= old.get("time", 0):
                        rows[int(r["step"])] = r
        return [rows[s] for s in sorted(rows) if up_to is None or s <= up_to]


def ray_storage(storage_path: str) -> tuple[str, Any]:
    """(path, pyarrow filesystem or None) for Ray's RunConfig: the one place a pyarrow
    filesystem is made (with a filesystem object Ray wants 'bucket/key', never 's3://')."""
    if not storage.is_url(storage_path) or storage.local_path(storage_path) is not None:
        return os.path.abspath(storage.local_path(storage_path) or storage_path), None
    import pyarrow.fs as pafs

    fs, path = storage.filesystem(storage_path)
    return path, pafs.PyFileSystem(pafs.FSSpecHandler(fs))


# --------------------------------------------------------------------------- writing


class CheckpointWriter:
    """Uploads one rank's checkpoint files in the background; rank 0 also commits.

    At most one upload is in flight: `submit` first waits for the previous one (normally
    long done: it had a whole checkpoint interval). An upload that failed raises at the next
    `submit` or `wait`, so a broken storage never goes unnoticed for long.
    """

    def __init__(self, run: RunDir, *, commit_timeout_s: float = 3600.0,
                 on_commit: Callable[[int, float], None] | None = None) -> None:
        self.run, self.commit_timeout_s, self.on_commit = run, commit_timeout_s, on_commit
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-upload")
        self._future: concurrent.futures.Future[None] | None = None
        self._keep: int | None = None

    def submit(self, step: int, staging: str, files: dict[str, str], record: dict[str, Any] | None = None,
               history: list[dict[str, Any]] | None = None, keep: int | None = None,
               produce: Callable[[], None] | None = None,
               prepare: Callable[[], dict[str, Any] | None] | None = None) -> None:
        """In the background: write the local files (`produce`), build the commit record
        (`prepare`, or the `record` given; rank 0 has one, its "files" the names every rank
        uploads), upload `files` (relative path in the checkpoint -> local path). With a
        record: before anything, apply retention for the checkpoints committed so far
        (`keep`); after the upload, write the history segment and, last of all, once every
        listed file is in storage, the record itself with each file's size. `staging` is
        removed when done."""
        self.wait()
        self._keep = keep
        self._future = self._pool.submit(self._run, step, staging, files, record, history, keep, produce, prepare)

    def wait(self) -> None:
        if self._future is not None:
            future, self._future = self._future, None
            future.result()

    def close(self) -> None:
        """Wait for the last upload, apply retention to it, stop the thread."""
        try:
            self.wait()
            if self._keep is not None:
                self.run.retain(self._keep)
        finally:
            self._pool.shutdown(wait=True)

    def _run(self, step: int, staging: str, files: dict[str, str], record: dict[str, Any] | None,
             history: list[dict[str, Any]] | None, keep: int | None, produce: Callable[[], None] | None,
             prepare: Callable[[], dict[str, Any] | None] | None) -> None:
        t0 = time.perf_counter()
        if keep is not None:
            self.run.retain(keep)  # the previous commit's, so that committing stays the last write
        base = f"checkpoints/{step_name(step)}"
        try:
            if produce is not None:
                produce()
            if prepare is not None:
                record = prepare()
            with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
                list(pool.map(lambda kv: self.run.put(kv[1], f"{base}/{kv[0]}"), files.items()))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if record is None:
            return
        if history:
            self.run.write_history(step, history)
        self._commit(step, record)
        if self.on_commit is not None:
            self.on_commit(step, time.perf_counter() - t0)

    def _commit(self, step: int, record: dict[str, Any]) -> None:
        """Write the record once every listed file is in storage (the other ranks upload theirs
        concurrently): one listing per poll, O(files). Uploads are atomic (one PUT, or a
        rename on local disk), so a listed file is whole; its listed size goes in the record."""
        deadline, delay = time.monotonic() + self.commit_timeout_s, 0.05
        while True:
            listing = self.run.listing(step)
            missing = [f for f in record["files"] if f not in listing]
            if not missing:
                record = dict(record, files={f: listing[f] for f in record["files"]})
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"checkpoint {self.run.checkpoint_url(step)} not committed: after "
                                   f"{self.commit_timeout_s:.0f} s {len(missing)} files are still missing, "
                                   f"e.g. {missing[:3]}")
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
        self.run.write_bytes(f"checkpoints/{step_name(step)}/{RECORD}", json.dumps(record).encode())


# --------------------------------------------------------------------------- reading for a resume


def own_files(record: dict[str, Any], rank: int) -> list[str]:
    """What rank `rank` reads to resume at the saved world size: its ZeRO files, the shared
    DeepSpeed files (none under ZeRO-3) and its EMA partition."""
    world = int(record["world_size"])
    out = []
    for rel in record["files"]:
        if rel.startswith(f"{DS_TAG}/"):
            r = ds_rank(rel)
            if r is None or r == rank:
                out.append(rel)
        elif rel == partition_file("ema", rank, world):
            out.append(rel)
    return out


def stub_other_ranks(record: dict[str, Any], rank: int, root: str) -> None:
    """Empty stand-ins for the other ranks' ZeRO files: DeepSpeed checks that every rank's
    file exists before it loads (only) its own, and we never download them."""
    for rel in record["files"]:
        if rel.startswith(f"{DS_TAG}/") and ds_rank(rel) not in (None, rank):
            path = os.path.join(root, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            Path(path).touch()


@contextlib.contextmanager
def _file_lock(path: str):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def to_universal(ds_dir: str, out: str, workers: int) -> None:
    """DeepSpeed ZeRO files -> a universal checkpoint (any world size), with parallel workers."""
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", ds_dir,
           "--output_folder", out, "--num_extract_workers", str(workers), "--num_merge_workers", str(workers)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ds_to_universal failed on {ds_dir}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")


def ensure_universal(run: RunDir, found: Found, *, converter: bool, workers: int, scratch: str,
                     timeout_s: float = 7200.0) -> dict[str, Any]:
    """The universal conversion of a checkpoint, made once and stored next to it.

    The `converter` (rank 0) converts if nobody has yet: it downloads every rank's ZeRO files,
    runs DeepSpeed's converter with `workers` processes and uploads the result, then writes
    `universal.json` (its file list) last. Every other rank waits for that file. Returns the
    universal record."""
    rec_url = storage.join(found.url, UNIVERSAL_RECORD)
    err_url = storage.join(found.url, "universal.error")
    if converter and not storage.exists(rec_url):
        try:
            ds_files = [r for r in found.record["files"] if r.startswith(f"{DS_TAG}/")]
            src = os.path.join(scratch, "convert-src")
            run.download(found.step, ds_files, src)
            out = os.path.join(scratch, "convert-out")
            to_universal(os.path.join(src, DS_TAG), os.path.join(out, UNIVERSAL), workers)
            files = local_listing(out)
            base = f"checkpoints/{step_name(found.step)}"
            with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
                list(pool.map(lambda rel: run.put(os.path.join(out, rel), f"{base}/{rel}"), files))
            run.write_bytes(f"{base}/{UNIVERSAL_RECORD}", json.dumps({"files": files}).encode())
            shutil.rmtree(src, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
        except BaseException as e:
            with contextlib.suppress(Exception):
                run.write_bytes(f"checkpoints/{step_name(found.step)}/universal.error", repr(e).encode())
            raise
    deadline, delay = time.monotonic() + timeout_s, 0.2
    while not storage.exists(rec_url):
        if storage.exists(err_url):
            raise RuntimeError(f"the universal conversion of {found.url} failed on rank 0: "
                               f"{storage.read_bytes(err_url).decode()[:500]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no universal conversion of {found.url} after {timeout_s:.0f} s")
        time.sleep(delay)
        delay = min(delay * 1.5, 5.0)
    return json.loads(storage.read_bytes(rec_url))


def fetch_universal(run: RunDir, found: Found, universal: dict[str, Any], cache_root: str) -> str:
    """A local copy of the universal checkpoint shared by the ranks of one machine (the first
    rank there downloads it, the others wait on a file lock); returns the DeepSpeed load dir."""
    key = re.sub(r"[^A-Za-z0-9._-]+", "_", found.url)[-150:]
    dest = os.path.join(cache_root, key)
    with _file_lock(dest + ".lock"):
        if not os.path.exists(os.path.join(dest, ".complete")):
            shutil.rmtree(dest, ignore_errors=True)
            run.download(found.step, universal["files"], dest)
            Path(dest, ".complete").touch()
    return dest


def default_cache_root() -> str:
    return os.environ.get("TRIP_CACHE", os.path.join(tempfile.gettempdir(), "trip-cache"))
