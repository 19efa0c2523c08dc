"""The preprocessing job: WebVid CSV + videos -> latent WebDataset shards, on Ray Data.

    trip preprocess --config pipelines/configs/tiny_cpu.yaml [--set preprocess.limit=100]
    python -m pipelines.preprocess --config ...

Stages: the driver reads and filters the CSV (a missing column fails here, before any
cluster resource is used; a bad row, such as a repeated videoid, goes to the errors
manifest with its line number unless `preprocess.strict_csv`) and plans rows into shards by
position; Ray Data decodes each video in a CPU task (PyAV; with `{ext}` in the path template
it also looks there for the video under the other usual extensions), encodes batches of
clips in an actor pool (one GPU per actor when the cluster has GPUs, CPU otherwise), and
streams results back in row order; the driver commits each shard as soon as all its rows
are in. Committed shards are skipped on a rerun, and because shard contents depend only on
the plan, the rerun's final set equals a clean run's. Latents are small (16x4x32x32 fp16 =
128 KiB a clip), so one writer keeps up with many decoders.

Only the `preprocess` and `codec` slices of the config are used.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from data_tools import metrics
from data_tools.decode import SamplingSpec, SkipVideo, decode_clip
from data_tools.shards import npy_bytes
from data_tools.webvid import CSVFormatError, VideoRow, other_extensions, read_rows
from data_tools.write import (
    JobMismatchError,
    Outcome,
    ShardPlanWriter,
    estimate_sample_bytes,
    rows_per_shard,
)
from trip.config import CodecConfig, ConfigError, PreprocessConfig, load_config
from trip.log import get_logger

log = get_logger(__name__)

# settings that change how fast the job runs (or whether a bad CSV row stops it), not what it writes
_SPEED_ONLY = ("csv", "output", "limit", "encode_batch_size", "encode_actors", "decode_threads",
               "metrics_port", "video_root", "samples_per_shard", "max_shard_bytes", "strict_csv")


_DECODE_MEMORY = 256 * 1024**2  # bytes a decode task may hold (one compressed video + frames)


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


# --------------------------------------------------------------------------- Ray stages


def sampling_spec(pre: PreprocessConfig) -> SamplingSpec:
    """Which frames of a video the job takes, and at what size, from the `preprocess` section."""
    return SamplingSpec(num_frames=pre.num_frames, fps=pre.fps, frame_stride=pre.frame_stride,
                        start_offset=pre.start_offset, resolution=pre.resolution, threads=pre.decode_threads)


def decode_row(item: dict[str, Any], spec: SamplingSpec, other_exts: bool = False) -> dict[str, Any]:
    """Ray Data map: one row -> its clip as npy bytes of uint8 [F, R, R, 3], or a skip reason.
    `other_exts`: when the row's file is missing, try it with the other video extensions."""
    out = {**item, "status": "ok", "stage": "", "reason": "", "frames": b"", "meta": "{}"}
    try:
        clip = decode_clip(item["url"], spec, fallbacks=other_extensions(item["url"]) if other_exts else ())
        out.update(frames=npy_bytes(clip.frames), meta=json.dumps(clip.meta))
    except SkipVideo as e:
        out.update(status="skipped", stage=e.stage, reason=e.reason)
    except Exception as e:  # noqa: BLE001 - a bug on one video must not stop the job
        out.update(status="error", stage="decode", reason=f"{type(e).__name__}: {e}")
    return out


class EncodeActor:
    """Ray Data actor: a batch of decoded rows -> latents (+ text states) as npy bytes."""

    def __init__(self, codec: CodecConfig, text_encoder: str | None, max_text_length: int,
                 batch_size: int) -> None:
        from data_tools.encode import ClipEncoder  # torch is imported only where it is used

        self.encoder = ClipEncoder(codec, text_encoder=text_encoder,
                                   max_text_length=max_text_length, batch_size=batch_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["ordinal"])
        status = [str(s) for s in batch["status"]]
        stage, reason = [str(s) for s in batch["stage"]], [str(s) for s in batch["reason"]]
        latents, texts, seconds = [b""] * n, [b""] * n, [0.0] * n
        ok = [i for i in range(n) if status[i] == "ok"]
        if ok:
            try:
                t0 = time.perf_counter()
                clips = np.stack([np.load(io.BytesIO(batch["frames"][i]), allow_pickle=False) for i in ok])
                lat = self.encoder.encode_frames(clips)
                text = self.encoder.encode_text([str(batch["caption"][i]) for i in ok])
                per_clip = (time.perf_counter() - t0) / len(ok)
                for j, i in enumerate(ok):
                    latents[i] = npy_bytes(lat[j])
                    texts[i] = npy_bytes(text[j]) if text is not None else b""
                    seconds[i] = per_clip
            except Exception as e:  # noqa: BLE001 - recorded per video in the errors manifest
                for i in ok:
                    status[i], stage[i], reason[i] = "error", "encode", f"{type(e).__name__}: {e}"
        out = {k: v for k, v in batch.items() if k != "frames"}
        out.update(status=np.array(status, dtype=object), stage=np.array(stage, dtype=object),
                   reason=np.array(reason, dtype=object), latents=np.array(latents, dtype=object),
                   text=np.array(texts, dtype=object), encode_seconds=np.array(seconds))
        return out


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
    what.update(codec=codec, text_encoder=text, rows_per_shard=per_shard)
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def _sample_meta(row: VideoRow, pre: PreprocessConfig, decoded: dict[str, Any]) -> dict[str, Any]:
    return {"videoid": row.videoid, "caption": row.caption, "source_url": row.url,
            "fps": pre.fps, "frame_stride": pre.frame_stride, "start_offset": pre.start_offset,
            "num_frames": pre.num_frames, "resolution": pre.resolution, "duration": row.duration,
            "page_dir": row.page_dir, "extra": json.loads(row.extra), **decoded}


def _outcome(rec: dict[str, Any], row: VideoRow, pre: PreprocessConfig) -> Outcome:
    o = Outcome(ordinal=int(rec["ordinal"]), row=row, status=str(rec["status"]),
                stage=str(rec["stage"]), reason=str(rec["reason"]))
    if o.status == "ok":
        o.latents = np.load(io.BytesIO(rec["latents"]), allow_pickle=False)
        o.text = np.load(io.BytesIO(rec["text"]), allow_pickle=False) if rec["text"] else None
        o.meta = _sample_meta(row, pre, json.loads(rec["meta"]))
    return o


def _build_dataset(items: list[dict[str, Any]], pre: PreprocessConfig, codec: CodecConfig):
    import ray
    import ray.data

    from trip.log import quiet_dependencies

    quiet_dependencies()  # again: importing ray.data configures its loggers afresh
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours counts videos and errors
    ctx.print_on_execution_start = False
    ctx.execution_options.preserve_order = True  # shards complete one after another
    spec = sampling_spec(pre)
    gpus = ray.cluster_resources().get("GPU", 0)
    actors = max(1, min(pre.encode_actors, int(gpus))) if gpus else max(1, pre.encode_actors)
    ds = ray.data.from_items(items, override_num_blocks=min(len(items), 4096))
    # the memory hint (one video held while decoding) also keeps decoding in CPU tasks: Ray
    # Data would otherwise fuse it into the encode actors, serialising decode behind encode
    # `{ext}` is a guess from contentUrl: the decode task looks for the other extensions itself
    other_exts = bool(pre.video_root) and "{ext}" in pre.path_template
    ds = ds.map(decode_row, fn_kwargs={"spec": spec, "other_exts": other_exts}, num_cpus=1,
                memory=_DECODE_MEMORY)
    return ds.map_batches(
        EncodeActor, fn_constructor_kwargs={
            "codec": codec, "text_encoder": pre.text_encoder,
            "max_text_length": pre.max_text_length, "batch_size": pre.encode_batch_size},
        batch_size=max(1, pre.encode_batch_size // pre.num_frames), batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=1 if gpus else 0, num_cpus=1)


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="preprocess", unit="video", disable=not enabled,
                dynamic_ncols=True, file=sys.stderr)


ShardCallback = Callable[[int, dict[str, Any]], None]


def run_preprocess(pre: PreprocessConfig, codec: CodecConfig, *, progress: bool = True,
                   on_shard_committed: ShardCallback | None = None) -> JobResult:
    """Run (or resume) the job; returns what it did.

    `on_shard_committed(shard, record)` is called in the driver after each shard this run
    commits (its progress record: samples, errors, bytes), e.g. to report progress elsewhere;
    an exception it raises stops the job with everything committed so far kept."""
    from data_tools.encode import codec_identity, latent_shape, text_encoder_identity

    t0 = time.perf_counter()
    if not pre.csv or not pre.output:
        raise ConfigError("preprocess.csv and preprocess.output must be set")
    found = read_rows(pre.csv, video_root=pre.video_root, path_template=pre.path_template,
                      min_duration=pre.min_duration, max_duration=pre.max_duration, limit=pre.limit,
                      strict=pre.strict_csv)
    if found.rejected:
        log.warning(f"{pre.csv}: {len(found.rejected)} rows rejected (first: line {found.rejected[0].line} "
                    f"{found.rejected[0].reason}); they are listed in the errors manifest")
    ident = codec_identity(codec)
    text_ident = text_encoder_identity(pre.text_encoder, pre.max_text_length)
    lat_shape = latent_shape(codec, pre.num_frames, pre.resolution)
    text_shape = [pre.max_text_length, text_ident["hidden_size"]] if text_ident else None
    per_shard = rows_per_shard(pre.samples_per_shard, pre.max_shard_bytes,
                               estimate_sample_bytes(lat_shape, text_shape))
    writer = ShardPlanWriter(pre.output, found.rows, per_shard,
                             fingerprint=_fingerprint(pre, ident, text_ident, per_shard),
                             latent_shape=lat_shape, text_shape=text_shape)
    records = writer.committed()
    pending = [s for s in range(len(writer.shards)) if s not in records]
    counts = {"ok": 0, "skipped": 0, "error": 0}
    if pending:
        with ray_session():
            _run_pending(writer, pending, records, pre, codec, counts, progress, on_shard_committed)
    extra = {"sampling": {"num_frames": pre.num_frames, "fps": pre.fps, "frame_stride": pre.frame_stride,
                          "start_offset": pre.start_offset, "resolution": pre.resolution}}
    index = writer.finish(records, codec=ident, text_encoder=text_ident, extra=extra,
                          rejected=found.rejected, csv_url=pre.csv)
    return JobResult(shards=len(writer.shards), shards_skipped=len(writer.shards) - len(pending),
                     ok=counts["ok"], skipped=counts["skipped"], errors=counts["error"],
                     rejected_rows=len(found.rejected), seconds=time.perf_counter() - t0, index=index)


def _run_pending(writer: ShardPlanWriter, pending: list[int], records: dict[int, dict[str, Any]],
                 pre: PreprocessConfig, codec: CodecConfig, counts: dict[str, int], progress: bool,
                 on_shard_committed: ShardCallback | None) -> None:
    """Stream the pending shards' rows through Ray Data and commit each shard when complete."""
    rows = writer.rows
    items = [{"ordinal": i, "shard": s, "videoid": rows[i].videoid, "url": rows[i].url,
              "caption": rows[i].caption} for s in pending for i in writer.shards[s]]
    buffers: dict[int, list[Outcome]] = defaultdict(list)
    bar = _progress_bar(len(rows), len(rows) - len(items), progress)
    try:
        for rec in _build_dataset(items, pre, codec).iter_rows():
            shard, row = int(rec["shard"]), rows[int(rec["ordinal"])]
            outcome = _outcome(rec, row, pre)
            counts[outcome.status] += 1
            metrics.VIDEOS.labels(status=outcome.status).inc()
            if outcome.status == "ok":
                metrics.ENCODE_SECONDS.observe(float(rec["encode_seconds"]))
            buffers[shard].append(outcome)
            bar.update(1)
            bar.set_postfix(skipped=counts["skipped"], errors=counts["error"], refresh=False)
            if len(buffers[shard]) < len(writer.shards[shard]):
                continue
            records[shard] = writer.commit(shard, buffers.pop(shard))
            if records[shard]["info"]:
                metrics.BYTES.inc(records[shard]["info"]["bytes"])
            metrics.SHARDS.inc()
            if on_shard_committed is not None:
                on_shard_committed(shard, records[shard])
    finally:
        bar.close()


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
