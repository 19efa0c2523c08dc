"""The preprocessing job: WebVid CSV + videos -> latent WebDataset shards, on Ray.

    trip preprocess --config pipelines/configs/tiny_cpu.yaml [--set preprocess.limit=100]
    python -m pipelines.preprocess --config ...

The driver streams the CSV once and plans its rows into shards by position
(`data_tools.webvid.scan_csv`: a missing column fails here, before any cluster resource is
used; a bad row, such as a repeated videoid, goes to the errors manifest with its line
number unless `preprocess.strict_csv`). It holds numbers, not rows: ~25 bytes a CSV record.

Each shard is then one Ray task (`write_shard`, spread over the nodes, one CPU): it reads
its rows from its byte range of the CSV, decodes each video (PyAV; with `{ext}` in the path
template it also looks for the video under the other usual extensions), encodes the clips
in batches, writes the samples in row order into the shard's tar and commits it straight to
the output; it returns only the shard's record. Where the clips are encoded:
- on a cluster with GPUs (or `preprocess.encode_on: actors`): a pool of `encode_actors`
  encoder actors (`encode_gpus_per_actor` GPUs each; the VAE in `codec.dtype`, e.g.
  bfloat16), which a shard task feeds with batches of clips, two batches in flight so it
  decodes the next batch while the actor encodes the last, preferring actors on its node;
- on a CPU-only cluster (`encode_on: auto`), in the shard task itself, with the codec
  loaded once per worker process: no frames cross processes at all.

Buckets (`preprocess.buckets`, see `data_tools.buckets`): each clip is decoded straight into
the bucket (height x width x frames) its frames choose, batches are encoded one bucket at a time
(a batch is one array), and a shard task writes one tar per bucket its rows went to,
`<bucket>/shard-NNNNNN.tar`, numbered by its shard like an unbucketed shard; index.json lists
the buckets with their latent shapes and counts. A clip that fits no bucket is an errors-manifest
line (stage bucket). The resolved bucket list is part of the job's identity.

Videos at http(s) URLs (WebVid's own `contentUrl`, or an http `video_root`) are downloaded by
`data_tools.fetch` under the `fetch_*` settings: connect/read/overall timeouts, retries with
backoff on 5xx, 429, resets and timeouts, a size cap, and at most `fetch_max_per_host`
downloads from one host at once across the cluster (one small named actor the driver creates
and every shard task borrows slots from). A video that cannot be fetched is a line in the
errors manifest (stage fetch, the reason, the URL without its query string); the task returns
its fetch counts with its stats, which the driver turns into metrics.

The driver keeps at most `shards_in_flight` tasks submitted (default: the cluster's CPUs),
notes each record in the progress manifest (`data_tools.write.Manifest`) and finishes with
errors.jsonl and index.json. Committed shards are skipped on a rerun, and because a shard's
contents depend only on the plan, the rerun's final set equals a clean run's.

Only the `preprocess` and `codec` slices of the config are used.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from data_tools import metrics
from data_tools.buckets import BucketShape, config_buckets
from data_tools.decode import SamplingSpec, SkipVideo, decode_bucketed, decode_clip
from data_tools.fetch import (
    Fetcher,
    FetchPolicy,
    HostSlots,
    NoSlots,
    cluster_slots,
    fetch_policy,
    is_http,
    redact_url,
)
from data_tools.webvid import (
    CSVFormatError,
    CSVPlan,
    ShardRange,
    VideoRow,
    check_template,
    other_extensions,
    read_range,
    scan_csv,
)
from data_tools.write import (
    JobMismatchError,
    Manifest,
    Outcome,
    ShardSamples,
    estimate_sample_bytes,
    finish,
    record_infos,
    rows_per_shard,
)
from trip.config import CodecConfig, ConfigError, PreprocessConfig, load_config
from trip.log import get_logger

log = get_logger(__name__)

# settings that change how fast the job runs (or whether a bad CSV row stops it), not what it writes
_SPEED_ONLY = ("csv", "output", "limit", "encode_batch_size", "encode_actors", "decode_threads",
               "metrics_port", "video_root", "samples_per_shard", "max_shard_bytes", "strict_csv",
               "encode_on", "encode_gpus_per_actor", "shards_in_flight",
               # a rerun may need a longer timeout or more tries to finish a job: they must not
               # make it a different job (they only decide which flaky downloads make it in)
               "fetch_connect_timeout_s", "fetch_read_timeout_s", "fetch_timeout_s", "fetch_tries",
               "fetch_backoff_s", "fetch_max_per_host", "fetch_max_mb")

_DECODE_MEMORY = 256 * 1024**2  # bytes a shard task may hold (one compressed video + frames + a batch)


@dataclass
class JobResult:
    """What a run did; `index` is the dataset's index.json content."""

    shards: int
    shards_skipped: int  # already committed by an earlier run
    ok: int
    skipped: int
    errors: int
    rejected_rows: int  # CSV rows not used (repeated or empty videoid, bad fields), in the errors manifest
    seconds: float
    index: dict[str, Any]
    bucket_samples: dict[str, int] = field(default_factory=dict)  # samples in each bucket (the whole dataset); {} unbucketed


# --------------------------------------------------------------------------- stages


def sampling_spec(pre: PreprocessConfig) -> SamplingSpec:
    """Which frames of a video the job takes, and at what size, from the `preprocess` section."""
    return SamplingSpec(num_frames=pre.num_frames, fps=pre.fps, frame_stride=pre.frame_stride,
                        start_offset=pre.start_offset, resolution=pre.resolution, threads=pre.decode_threads)


def decode_row(row: VideoRow, spec: SamplingSpec, other_exts: bool = False,
               fetch: Fetcher | None = None, buckets: list[BucketShape] | None = None,
               max_crop: float = 0.0) -> tuple[np.ndarray | None, Outcome]:
    """One row -> (its clip, uint8 [F, R, R, 3], or None; its outcome so far: ok with the
    decode meta, or skipped/error with the stage and reason). `other_exts`: when the row's
    file is missing, try it with the other video extensions. `fetch`: how http(s) videos are
    downloaded (None: the default policy). The outcome's row carries the redacted URL: it is
    what the errors manifest shows. `buckets`: decode into the clip's bucket (the outcome's
    `bucket`; a clip fitting none is skipped at stage "bucket"), cropping at most `max_crop`."""
    o = Outcome(ordinal=-1, row=replace(row, url=redact_url(row.url)), status="ok")
    fallbacks = other_extensions(row.url) if other_exts else ()
    try:
        if buckets:
            clip = decode_bucketed(row.url, spec, buckets, max_crop=max_crop, fallbacks=fallbacks, fetch=fetch)
            o.bucket = clip.meta["bucket"]
        else:
            clip = decode_clip(row.url, spec, fallbacks=fallbacks, fetch=fetch)
    except SkipVideo as e:
        o.status, o.stage, o.reason = "skipped", e.stage, e.reason
        return None, o
    except Exception as e:  # noqa: BLE001 - a bug on one video must not stop the job
        o.status, o.stage, o.reason = "error", "decode", f"{type(e).__name__}: {e}"
        return None, o
    o.meta = clip.meta
    return clip.frames, o


class Encoder:
    """Clips -> latents (+ text states): the codec and text encoder, loaded once."""

    def __init__(self, codec: CodecConfig, text_encoder: str | None, max_text_length: int,
                 batch_size: int) -> None:
        from data_tools.encode import ClipEncoder  # torch is imported only where it is used

        self.encoder = ClipEncoder(codec, text_encoder=text_encoder, max_text_length=max_text_length,
                                   batch_size=batch_size)

    def encode(self, clips: np.ndarray, captions: list[str]) -> tuple[np.ndarray, np.ndarray | None, float]:
        """uint8 [N, F, H, W, 3] and N captions -> (float16 latents [N, F, C, h, w], float16
        text states [N, L, D] or None, seconds a clip)."""
        t0 = time.perf_counter()
        lat = self.encoder.encode_frames(clips)
        text = self.encoder.encode_text(captions)
        return lat, text, (time.perf_counter() - t0) / max(1, len(clips))

    def node(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()


_LOCAL: dict[str, Encoder] = {}  # this worker process's encoder, by settings


def local_encoder(job: ShardJob) -> Encoder:
    """The encoder of this process for `job`'s settings (loaded on first use, then kept:
    Ray reuses worker processes, so a CPU cluster loads the codec once per worker)."""
    key = json.dumps([asdict(job.codec), job.pre.text_encoder, job.pre.max_text_length], sort_keys=True)
    if key not in _LOCAL:
        _LOCAL.clear()
        _LOCAL[key] = Encoder(job.codec, job.pre.text_encoder, job.pre.max_text_length, job.pre.encode_batch_size)
    return _LOCAL[key]


@dataclass
class ShardJob:
    """What every shard task of a run shares (small: sent with each task)."""

    pre: PreprocessConfig
    codec: CodecConfig
    columns: list[str]
    identity: dict[str, str]  # {fingerprint, plan}: carried by every record
    latent_shape: list[int]
    text_shape: list[int] | None
    fetch: FetchPolicy = field(default_factory=FetchPolicy)  # how http(s) videos are downloaded
    host_slots: HostSlots = field(default_factory=NoSlots)  # the cluster's per-host download cap
    latent_shapes: dict[str, list[int]] | None = None  # bucketed: each bucket's latent shape, in config order

    @property
    def clips_per_batch(self) -> int:
        return self.batch_clips(self.pre.num_frames)

    def batch_clips(self, frames: int) -> int:
        """Clips of `frames` frames in one encode batch (encode_batch_size counts frames)."""
        return max(1, self.pre.encode_batch_size // frames)


def _sample_meta(row: VideoRow, pre: PreprocessConfig, decoded: dict[str, Any]) -> dict[str, Any]:
    return {"videoid": row.videoid, "caption": row.caption, "source_url": redact_url(row.url),
            "fps": pre.fps, "frame_stride": pre.frame_stride, "start_offset": pre.start_offset,
            "num_frames": pre.num_frames, "resolution": pre.resolution, "duration": row.duration,
            "page_dir": row.page_dir, "extra": json.loads(row.extra), **decoded}


def write_shard(job: ShardJob, rng: ShardRange, encoders: list[Any] | None = None) -> dict[str, Any]:
    """The shard task: rows -> decoded clips -> latents -> committed tar(s); returns
    {"record": the shard's record, "stats": {node, pid, counts, encode [(seconds a clip, clips)],
    fetch {tries, retries, bytes, failures {kind: n}}, buckets {bucket: samples}}} (node and
    pid: where the shard was written). Bucketed (`preprocess.buckets`): each clip is decoded
    into its bucket, batches are encoded one bucket at a time, and each bucket that got samples
    gets its own tar numbered by this shard.

    `encoders`: encoder actor handles (with their node ids) to send batches to, or None to
    encode here. A failure that is not one video's (the output unwritable, an encoder actor
    gone) fails the task with the shard named; the partial tar is removed."""
    pre = job.pre
    spec = sampling_spec(pre)
    buckets = config_buckets(pre)
    if buckets and not job.latent_shapes:
        raise ValueError("a bucketed job (preprocess.buckets) needs ShardJob.latent_shapes, one per bucket")
    frames_of = {b.name: b.frames for b in buckets or []}
    other_exts = bool(pre.video_root) and "{ext}" in pre.path_template
    rows = read_range(pre.csv, job.columns, rng, video_root=pre.video_root, path_template=pre.path_template)
    samples = ShardSamples(pre.output, rng.shard, job.identity, job.latent_shape, job.text_shape,
                           job.latent_shapes if buckets else None)
    counts = {"ok": 0, "skipped": 0, "error": 0}
    by_bucket: dict[str, int] = {}
    fetcher = Fetcher(job.fetch, job.host_slots)
    encode_times: list[tuple[float, int]] = []
    submit = _encode_submitter(job, rng.shard, encoders)
    in_flight: deque[tuple[list[Outcome], Any]] = deque()  # batches sent, oldest first
    done: list[Outcome] = []  # outcomes in row order, waiting for earlier batches
    waiting: set[int] = set()  # rows whose clip is in a batch not yet encoded (sent or still filling)

    def settle(block: bool) -> None:
        while in_flight and (block or len(in_flight) >= 2):
            outcomes, result = in_flight.popleft()
            _apply(outcomes, result, job, encode_times)
            waiting.difference_update(o.ordinal for o in outcomes)
            flush_ready()

    def flush_ready() -> None:
        # rows before the first one still waiting for its latents are final: add them in order
        while done and done[0].ordinal not in waiting:
            o = done.pop(0)
            counts[o.status] += 1
            if o.status == "ok" and o.bucket:
                by_bucket[o.bucket] = by_bucket.get(o.bucket, 0) + 1
            samples.add(o)

    def send(batch: list[tuple[Outcome, np.ndarray]]) -> None:
        in_flight.append(([b[0] for b in batch], submit([b[1] for b in batch], [b[0].row.caption for b in batch])))
        settle(block=False)

    try:
        # one filling batch per clip shape (a batch is one array); unbucketed: one, as before
        filling: dict[str | None, list[tuple[Outcome, np.ndarray]]] = {}
        for k, row in enumerate(rows):
            clip, o = decode_row(row, spec, other_exts, fetcher, buckets, pre.bucket_max_crop)
            o.ordinal = rng.first + k
            done.append(o)
            if clip is not None:
                o.meta = _sample_meta(row, pre, o.meta or {})
                waiting.add(o.ordinal)
                batch = filling.setdefault(o.bucket, [])
                batch.append((o, clip))
                if len(batch) >= job.batch_clips(frames_of.get(o.bucket or "", pre.num_frames)):
                    send(filling.pop(o.bucket))
            flush_ready()
        for key in list(filling):  # the last, partial batches, in the order their shapes first came
            send(filling.pop(key))
        settle(block=True)
        flush_ready()
        record = samples.commit()
    except BaseException:
        samples.abort()
        raise
    import ray

    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    return {"record": record,
            "stats": {"node": node, "pid": os.getpid(), "counts": counts, "encode": encode_times,
                      "fetch": fetcher.stats, "buckets": by_bucket}}


def _encode_submitter(job: ShardJob, shard: int, encoders: list[Any] | None) -> Callable[..., Any]:
    """A function (clips, captions) -> a pending or finished encode result."""
    if not encoders:
        encoder = local_encoder(job)

        def here(clips: list[np.ndarray], captions: list[str]) -> Any:
            try:
                return encoder.encode(np.stack(clips), captions)
            except Exception as e:  # noqa: BLE001 - recorded per video in the errors manifest
                return e
        return here
    import ray

    mine = ray.get_runtime_context().get_node_id()
    local = [a for a, node in encoders if node == mine] or [a for a, _ in encoders]
    turn = iter(range(shard, 1 << 62))

    def remote(clips: list[np.ndarray], captions: list[str]) -> Any:
        return local[next(turn) % len(local)].encode.remote(np.stack(clips), captions)
    return remote


def _apply(outcomes: list[Outcome], result: Any, job: ShardJob, encode_times: list[tuple[float, int]]) -> None:
    """Put a batch's encode result (or its failure) into its outcomes."""
    if not isinstance(result, (tuple, Exception)):  # an actor's pending result
        import ray

        try:
            result = ray.get(result)
        except ray.exceptions.RayTaskError as e:  # the encoder raised: these videos' error
            result = e.cause if isinstance(e.cause, Exception) else e
    if isinstance(result, Exception):
        for o in outcomes:
            o.status, o.stage, o.reason = "error", "encode", f"{type(result).__name__}: {result}"
        return
    lat, text, per_clip = result
    for j, o in enumerate(outcomes):
        o.latents = lat[j]
        o.text = text[j] if text is not None else None
    encode_times.append((per_clip, len(outcomes)))


# --------------------------------------------------------------------------- driver


@contextlib.contextmanager
def ray_session(num_cpus: int | None = None) -> Iterator[None]:
    """Use a running Ray, else connect to RAY_ADDRESS, else start a small local one (and stop it)."""
    import ray

    if ray.is_initialized():
        yield
        return
    from trip.log import init_ray

    address = os.environ.get("RAY_ADDRESS")
    if address:
        init_ray(address=address)
    else:
        # address="local": start our own instance even if another cluster runs on this machine
        init_ray(address="local", num_cpus=num_cpus or max(2, min(4, os.cpu_count() or 2)),
                 include_dashboard=False)
    try:
        yield
    finally:
        ray.shutdown()


def _fingerprint(pre: PreprocessConfig, codec: dict[str, Any], text: dict[str, Any] | None,
                 per_shard: int) -> str:
    what = {k: v for k, v in asdict(pre).items() if k not in _SPEED_ONLY}
    if pre.buckets is None:  # an unbucketed job keeps the fingerprint it had before buckets existed
        del what["buckets"], what["bucket_max_crop"]
    else:
        what["bucket_shapes"] = pre.bucket_shapes()
    what.update(codec=codec, text_encoder=text, rows_per_shard=per_shard)
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def plan_identity(plan: CSVPlan, per_shard: int) -> str:
    """Which rows each shard holds: the CSV's bytes, how many rows were kept, rows a shard."""
    what = [plan.digest, len(plan), per_shard]
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:16]


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="preprocess", unit="video", disable=not enabled,
                dynamic_ncols=True, file=sys.stderr)


ShardCallback = Callable[[int, dict[str, Any], dict[str, Any]], None]


def run_preprocess(pre: PreprocessConfig, codec: CodecConfig, *, progress: bool = True,
                   on_shard_committed: ShardCallback | None = None) -> JobResult:
    """Run (or resume) the job; returns what it did.

    `on_shard_committed(shard, record, stats)` is called in the driver after each shard this
    run commits, with its progress record (samples, errors, bytes) and the task's stats (the
    node and pid that wrote it, counts by status), e.g. to report progress elsewhere; an
    exception it raises stops the job with everything committed so far kept."""
    from data_tools.encode import codec_identity, latent_shape, text_encoder_identity

    t0 = time.perf_counter()
    if not pre.csv or not pre.output:
        raise ConfigError("preprocess.csv and preprocess.output must be set")
    plan = scan_csv(pre.csv, video_root=pre.video_root, min_duration=pre.min_duration,
                    max_duration=pre.max_duration, limit=pre.limit, strict=pre.strict_csv)
    check_template(pre.csv, plan.columns, pre.video_root, pre.path_template)
    if plan.rejected:
        log.warning(f"{pre.csv}: {len(plan.rejected)} rows rejected (first: line {plan.rejected[0].line} "
                    f"{plan.rejected[0].reason}); they are listed in the errors manifest")
    ident = codec_identity(codec)
    text_ident = text_encoder_identity(pre.text_encoder, pre.max_text_length)
    buckets = config_buckets(pre)
    bucket_specs = _bucket_specs(codec, buckets) if buckets else None
    lat_shape = bucket_specs[0]["latent_shape"] if bucket_specs else latent_shape(codec, pre.num_frames, pre.resolution)
    text_shape = [pre.max_text_length, text_ident["hidden_size"]] if text_ident else None
    # shards are sized for the largest sample a row can become
    largest = max((b["latent_shape"] for b in bucket_specs or []), key=lambda s: int(np.prod(s)), default=lat_shape)
    per_shard = rows_per_shard(pre.samples_per_shard, pre.max_shard_bytes,
                               estimate_sample_bytes(largest, text_shape))
    identity = {"fingerprint": _fingerprint(pre, ident, text_ident, per_shard),
                "plan": plan_identity(plan, per_shard)}
    num_shards = plan.num_shards(per_shard)
    manifest = Manifest(pre.output, identity)
    done_before = manifest.load(num_shards)
    pending = [s for s in range(num_shards) if s not in done_before]
    counts = {"ok": 0, "skipped": 0, "error": 0}
    if pending:
        with ray_session():
            job = ShardJob(pre=pre, codec=codec, columns=plan.columns, identity=identity,
                           latent_shape=lat_shape, text_shape=text_shape, fetch=fetch_policy(pre),
                           host_slots=_host_slots(pre),
                           latent_shapes={b["name"]: b["latent_shape"] for b in bucket_specs} if bucket_specs else None)
            _run_pending(job, plan, per_shard, pending, manifest, counts, progress, on_shard_committed)
    extra = {"sampling": {"num_frames": pre.num_frames, "fps": pre.fps, "frame_stride": pre.frame_stride,
                          "start_offset": pre.start_offset, "resolution": pre.resolution}}
    if buckets:
        extra["sampling"].update(num_frames=None, resolution=None, bucket_max_crop=pre.bucket_max_crop)
    index = finish(pre.output, manifest.records, num_shards, latent_shape=lat_shape, text_shape=text_shape,
                   codec=ident, text_encoder=text_ident, extra=extra, num_rows=len(plan),
                   rejected=plan.rejected, csv_url=pre.csv, buckets=bucket_specs)
    manifest.compact()
    per_bucket = {b["name"]: b["samples"] for b in index.get("buckets", [])}
    if per_bucket:
        log.info("preprocess: samples per bucket: " + ", ".join(f"{k} {v}" for k, v in per_bucket.items()))
    return JobResult(shards=num_shards, shards_skipped=num_shards - len(pending),
                     ok=counts["ok"], skipped=counts["skipped"], errors=counts["error"],
                     rejected_rows=len(plan.rejected), seconds=time.perf_counter() - t0, index=index,
                     bucket_samples=per_bucket)


def _bucket_specs(codec: CodecConfig, buckets: list[BucketShape]) -> list[dict[str, Any]]:
    """index.json's description of each bucket: {name, height, width, frames, latent_shape}.
    A size the codec cannot encode is an error naming the bucket."""
    from data_tools.encode import codec_identity, latent_shape

    down = int(codec_identity(codec)["downscale"])
    specs = []
    for b in buckets:
        if b.height % down or b.width % down:
            raise ConfigError(f"preprocess.buckets: bucket {b.name} (HxWxF): {b.height}x{b.width} pixels are not "
                              f"divisible by the codec's downscale {down} (with a grid, set multiple_of to a "
                              f"multiple of {down})")
        specs.append({"name": b.name, "height": b.height, "width": b.width, "frames": b.frames,
                      "latent_shape": latent_shape(codec, b.frames, (b.height, b.width))})
    return specs


def _host_slots(pre: PreprocessConfig) -> HostSlots:
    """The cluster's per-host download cap, where rows may be http(s) URLs (contentUrl, or an
    http video_root): one small actor, created once a run and borrowed by every shard task."""
    if pre.video_root and not is_http(pre.video_root):
        return NoSlots()
    return cluster_slots(pre.fetch_max_per_host)


def _encoder_pool(job: ShardJob) -> list[tuple[Any, str]] | None:
    """Encoder actors and their nodes, or None when shard tasks encode themselves."""
    import ray

    pre = job.pre
    gpus = ray.cluster_resources().get("GPU", 0)
    if pre.encode_on == "tasks" or (pre.encode_on == "auto" and not gpus):
        return None
    per_actor = pre.encode_gpus_per_actor if gpus else 0
    count = max(1, min(pre.encode_actors, int(gpus / per_actor))) if per_actor else max(1, pre.encode_actors)
    cls = ray.remote(Encoder).options(num_gpus=per_actor, num_cpus=1)
    actors = [cls.remote(job.codec, pre.text_encoder, pre.max_text_length, pre.encode_batch_size)
              for _ in range(count)]
    nodes = ray.get([a.node.remote() for a in actors])
    return list(zip(actors, nodes, strict=True))


def _run_pending(job: ShardJob, plan: CSVPlan, per_shard: int, pending: list[int], manifest: Manifest,
                 counts: dict[str, int], progress: bool, on_shard_committed: ShardCallback | None) -> None:
    """Run a task per pending shard, at most `shards_in_flight` at once, and note each record."""
    import ray

    pre = job.pre
    encoders = _encoder_pool(job)
    task = ray.remote(write_shard).options(
        num_cpus=1, memory=_DECODE_MEMORY, scheduling_strategy="SPREAD",
        max_retries=3, retry_exceptions=[OSError])  # storage hiccups; a video's failure is its error line
    limit = pre.shards_in_flight or max(1, int(ray.cluster_resources().get("CPU", 1)))
    job_ref = ray.put(job)
    todo = deque(pending)
    running: dict[Any, int] = {}
    bar = _progress_bar(len(plan), len(plan) - sum(min(per_shard, len(plan) - s * per_shard) for s in pending),
                        progress)
    try:
        while todo or running:
            while todo and len(running) < limit:
                shard = todo.popleft()
                running[task.remote(job_ref, plan.shard(shard, per_shard), encoders)] = shard
            ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                shard = running.pop(ref)
                try:
                    out = ray.get(ref)
                except ray.exceptions.RayTaskError as e:
                    raise RuntimeError(f"shard {shard} of {pre.output} failed: {e.cause or e}") from e
                record, stats = out["record"], out["stats"]
                manifest.add(record)
                _count(stats, record, counts)
                bar.update(sum(stats["counts"].values()))
                bar.set_postfix(skipped=counts["skipped"], errors=counts["error"], refresh=False)
                if on_shard_committed is not None:
                    on_shard_committed(shard, record, stats)
                manifest.maybe_flush()
    finally:
        for ref in running:  # stopped early: what is not committed is redone by the next run
            ray.cancel(ref)
        manifest.flush()
        bar.close()


def _count(stats: dict[str, Any], record: dict[str, Any], counts: dict[str, int]) -> None:
    for status, n in stats["counts"].items():
        counts[status] += n
        if n:
            metrics.VIDEOS.labels(status=status).inc(n)
    for per_clip, n in stats["encode"]:
        for _ in range(n):
            metrics.ENCODE_SECONDS.observe(per_clip)
    fetched = stats.get("fetch") or {}
    if fetched.get("retries"):
        metrics.FETCH_RETRIES.inc(fetched["retries"])
    for kind, n in (fetched.get("failures") or {}).items():
        metrics.FETCH_FAILURES.labels(kind=kind).inc(n)
    if fetched.get("bytes"):
        metrics.FETCH_BYTES.inc(fetched["bytes"])
    for info in record_infos(record):
        metrics.BYTES.inc(info["bytes"])
        if info.get("bucket"):
            metrics.BUCKET_SAMPLES.labels(bucket=info["bucket"]).inc(info["samples"])
    metrics.SHARDS.inc()


# --------------------------------------------------------------------------- entry points


def cli(args: argparse.Namespace) -> int:
    """`trip preprocess --config X [--set k=v ...]`."""
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    exporter = metrics.start_exporter(cfg.preprocess.metrics_port)
    try:
        result = run_preprocess(cfg.preprocess, cfg.codec)
    except (CSVFormatError, FileNotFoundError, JobMismatchError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if exporter is not None:
            exporter.shutdown()
            exporter.server_close()
    idx = result.index
    print(f"preprocess: {idx['num_samples']} samples in {len(idx['shards'])} shards at "
          f"{cfg.preprocess.output} ({result.shards_skipped} of {result.shards} shards were already "
          f"done; this run: {result.ok} ok, {result.skipped} skipped, {result.errors} errors; "
          f"{result.rejected_rows} CSV rows rejected; {result.seconds:.1f} s)")
    if result.bucket_samples:
        print("preprocess: samples per bucket (HxWxF): "
              + ", ".join(f"{name} {n}" for name, n in result.bucket_samples.items()))
    if idx["num_errors"]:
        print(f"preprocess: {idx['num_errors']} videos or CSV rows not usable, see "
              f"{cfg.preprocess.output.rstrip('/')}/{idx['errors_manifest']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from trip.cli import add_config_args, parse_args

    parser = argparse.ArgumentParser(prog="python -m pipelines.preprocess", description=__doc__.split("\n")[0])
    add_config_args(parser)
    return cli(parse_args(parser, argv))


if __name__ == "__main__":
    sys.exit(main())
