"""`make demo`: the whole platform end to end on embedded defaults.

    python -m pipelines.demo [--s3] [--out outputs/demo] [--steps N] [--videos N]

1. `data_tools synth`: a synthetic WebVid-format dataset (moving coloured shapes) plus
   held-back first frames that training never sees;
2. the Ray preprocessing job -> latent shards in the embedded object store: a local
   directory through file://, or with --s3 a bucket on an S3 server started on 127.0.0.1
   (moto's server mode speaks the real S3 API) and stopped at the end;
3. Ray Train, 2 CPU workers, DeepSpeed ZeRO-3, streaming those shards, checkpoints into
   the store, Prometheus exporters on;
4. export the EMA weights, sample image->video for the held-back frames (GIF + MP4, and a
   strip image of every frame), and write summary.json next to the loss/throughput plot.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from trip.cli import add_verbose_arg
from trip.eval.quality import summarize
from trip.log import get_logger, set_verbose
from trip.log import setup as setup_logging

CONFIG = Path(__file__).resolve().parent / "configs" / "tiny_cpu.yaml"
# On top of tiny_cpu.yaml. A CPU step of the tiny model costs about the same for 4 or 16
# samples (overheads dominate), and measured on 2 cores a from-scratch model needs roughly
# 600 steps of 32 clips to move the shapes the right way: fewer, larger batches make the
# demo learn visible motion in ~5 minutes of training.
DEMO_OVERRIDES = ["data.micro_batch_size=16", "train.global_batch_size=32", "train.max_steps=600",
                  "train.checkpoint_every=200", "train.log_every=25", "train.validate_every=200"]


log = get_logger("demo")


def _say(step: str, text: str) -> None:
    log.info(f"{step}: {text}")


@contextlib.contextmanager
def embedded_store(out: Path, s3: bool) -> Iterator[str]:
    """The object store the demo writes to: file://<out>/store, or a bucket on a local S3 server."""
    if not s3:
        root = (out / "store").resolve()
        root.mkdir(parents=True, exist_ok=True)
        yield f"file://{root}"
        return
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    # Demo-only credentials for the throwaway local server; real runs take them from the
    # environment or a Kubernetes Secret.
    os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "demo",
                       "AWS_SECRET_ACCESS_KEY": "demo", "AWS_DEFAULT_REGION": "us-east-1"})
    try:
        import s3fs

        s3fs.S3FileSystem(endpoint_url=endpoint).mkdir("trip-demo")
        log.info(f"S3 server on {endpoint}, bucket s3://trip-demo")
        yield "s3://trip-demo"
    finally:
        server.stop()


@contextlib.contextmanager
def local_ray() -> Iterator[None]:
    """One local Ray for both jobs (each would otherwise start and stop its own), started
    after the store so that workers inherit its endpoint settings."""
    import ray

    from trip.log import init_ray

    init_ray(address="local", num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=True)
    try:
        yield
    finally:
        ray.shutdown()


def demo_config(out: Path, store: str, steps: int | None, sample_steps: int | None = None):
    """tiny_cpu.yaml with every path pointed into this demo's folders."""
    from trip.config import load_config

    cfg = load_config(CONFIG, [*DEMO_OVERRIDES, f"data.validation={store}/validation"])
    webvid = (out / "webvid").resolve()
    cfg.preprocess = replace(cfg.preprocess, csv=str(webvid / "results.csv"), video_root=str(webvid / "videos"),
                             output=f"{store}/shards")
    cfg.data = replace(cfg.data, dataset=f"{store}/shards")
    cfg.run = replace(cfg.run, storage_path=f"{store}/runs", output_dir=str((out / "run").resolve()))
    if steps:
        every = min(cfg.train.checkpoint_every, steps)
        cfg.train = replace(cfg.train, max_steps=steps, checkpoint_every=every, validate_every=every,
                            log_every=min(cfg.train.log_every, steps), warmup_steps=min(cfg.train.warmup_steps, steps))
    if sample_steps:
        cfg.sample = replace(cfg.sample, steps=sample_steps)
    return cfg


def sample_holdout(model_dir: str, holdout: Path, out: Path, sample_cfg) -> tuple[list[str], dict]:
    """Sample every held-back first frame; returns the written files and {name: uint8 frames}."""
    import numpy as np
    import torch
    from PIL import Image

    from trip.sampling import generate, load_pipeline, prepare_image
    from trip.video import read_frames, to_uint8, write_gif, write_mp4

    pipe, _ = load_pipeline(model_dir)
    size = pipe.image_size
    images = sorted(holdout.glob("*.png"))
    batch = torch.stack([prepare_image(read_frames(str(p), 1)[0], size) for p in images])
    videos = generate(pipe, batch, sample_cfg, progress=True)
    out.mkdir(parents=True, exist_ok=True)
    written, strips, frames = [], [], {}
    for path, video in zip(images, videos):
        written.append(write_gif(video, str(out / f"{path.stem}.gif"), fps=sample_cfg.fps, scale=4))
        written.append(write_mp4(video, str(out / f"{path.stem}.mp4"), fps=sample_cfg.fps))
        frames[path.stem] = to_uint8(video)
        strips.append(np.concatenate(list(frames[path.stem]), axis=1))
    strip = Image.fromarray(np.concatenate(strips, axis=0))
    strip = strip.resize((strip.width * 4, strip.height * 4), Image.NEAREST)
    strip.save(out / "all_frames.png")
    written.append(str(out / "all_frames.png"))
    return written, frames


def score_samples(generated: dict, holdout: Path, pre) -> dict[str, dict[str, float]]:
    """Each sample against its held-back video, decoded exactly as preprocessing decodes
    training videos: PSNR (mean, first and last frame), SSIM and the motion score."""
    from data_tools.decode import decode_clip
    from pipelines.preprocess import sampling_spec
    from trip.eval.quality import clip_quality

    spec = sampling_spec(pre)
    return {name: clip_quality(frames, decode_clip(str(holdout / f"{name}.mp4"), spec).frames)
            for name, frames in sorted(generated.items())}


def validation_summary(cfg) -> dict[str, dict]:
    """{step: validation figures} of the run, from its storage."""
    from trip import storage
    from trip.train.checkpoint import RunDir
    from trip.train.validation import RESULT

    run = RunDir(cfg.run.storage_path, cfg.run.name)
    out = {}
    for step in range(cfg.train.validate_every, cfg.train.max_steps + 1, cfg.train.validate_every):
        url = storage.join(run.validation_url(step), RESULT)
        if storage.exists(url):
            figures = json.loads(storage.read_bytes(url))
            out[str(step)] = {k: v for k, v in figures.items() if k != "per_clip"}
    return out


def quality_table(per_clip: dict[str, dict[str, float]], captions: dict[str, str]) -> list[str]:
    """The demo's closing table: one line per held-back clip."""
    lines = [f"  {'clip':<28} {'PSNR first -> last':>18} {'moved / true px':>16} {'ratio':>6} {'dir err':>8}"]
    for name, q in per_clip.items():
        lines.append(f"  {name + ' ' + captions.get(name, ''):<28.28} {q['psnr_first']:>8.1f} -> {q['psnr_last']:<5.1f}dB"
                     f" {q.get('displacement_px', float('nan')):>7.1f} / {q.get('reference_displacement_px', float('nan')):<5.1f}"
                     f" {q.get('displacement_ratio', float('nan')):>6.2f} {q.get('direction_error_deg', float('nan')):>7.0f}°")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.demo", description=__doc__.split("\n")[0])
    ap.add_argument("--s3", action="store_true", help="use an S3 server on 127.0.0.1 as the object store")
    ap.add_argument("--out", default="outputs/demo", help="where everything is written")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the config's)")
    ap.add_argument("--videos", type=int, default=64, help="synthetic videos to generate")
    ap.add_argument("--sample-steps", type=int, default=None, help="DDIM steps for the samples (default: config)")
    add_verbose_arg(ap)
    args = ap.parse_args(argv)
    setup_logging()
    set_verbose(args.verbose)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from data_tools.synth import make_dataset

    _say("1/4 synth", f"{args.videos} synthetic WebVid-format videos -> {out / 'webvid'}")
    make_dataset(str(out / "webvid"), num=args.videos, seed=0, size=64, seconds=2.0, fps=8, holdout=4,
                 motion="by_color")

    with embedded_store(out, args.s3) as store, local_ray():
        cfg = demo_config(out, store, args.steps, args.sample_steps)

        from pipelines.preprocess import run_preprocess

        _say("2/4 preprocess", f"Ray job, a task a shard -> latent shards in {cfg.preprocess.output}")
        pre = run_preprocess(cfg.preprocess, cfg.codec)
        log.info(f"{pre.index['num_samples']} samples in {len(pre.index['shards'])} shards ({pre.seconds:.1f} s)")
        # the held-back videos become the validation set: scored while training runs
        held = run_preprocess(replace(cfg.preprocess, csv=str((out / "webvid" / "holdout" / "results.csv").resolve()),
                                      video_root=None, output=cfg.data.validation), cfg.codec)
        log.info(f"validation set: {held.index['num_samples']} held-back samples in {cfg.data.validation}")

        from pipelines.train import run_training

        _say("3/4 train", f"Ray Train, {cfg.scaling.num_workers} CPU workers, DeepSpeed ZeRO-{cfg.train.zero.stage}, "
                          f"{cfg.train.max_steps} steps; checkpoints in {cfg.run.storage_path}")
        result = run_training(cfg)

        from trip.train.export import export_checkpoint

        model_dir = str((out / "model").resolve())
        _say("4/4 export + sample", f"{result.checkpoint} -> {model_dir}")
        export_checkpoint(result.checkpoint, model_dir, use_ema=True)
        holdout = out / "webvid" / "holdout"
        files, generated = sample_holdout(model_dir, holdout, out / "samples", cfg.sample)
        quality = score_samples(generated, holdout, cfg.preprocess)

    summary = {
        "steps": result.steps,
        "samples_per_second": result.samples_per_second,
        "final_loss": result.final_loss,
        "checkpoint": result.checkpoint,
        "model": model_dir,
        "shards": cfg.preprocess.output,
        "samples": files,
        "plot": result.plot,
        "quality": {"per_clip": quality, "mean": summarize(quality)},
        "validation": validation_summary(cfg),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    with open(holdout / "captions.csv") as f:
        captions = {Path(r["file"]).stem: r["caption"].removeprefix("a ") for r in csv.DictReader(f)}
    _say("done", f"in {summary['seconds']} s")
    print(f"  steps {summary['steps']}, {summary['samples_per_second']:.1f} samples/s, "
          f"final loss {summary['final_loss']:.4f}")
    print("  samples vs the held-back videos (ratio: distance moved the right way / true distance):")
    print("\n".join(quality_table(quality, captions)))
    print(f"  samples:   {out / 'samples'} (GIF + MP4 per held-back frame; all_frames.png shows every frame)")
    print(f"  plot:      {result.plot}")
    print(f"  model:     {model_dir}")
    print(f"  summary:   {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
