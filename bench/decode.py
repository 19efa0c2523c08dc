"""Preprocessing speed: our PyAV decode+resize vs the ffmpeg CLI, and the whole job on CPU.

1. decode: clips/s of `data_tools.decode.decode_clip` (16 frames at 4 fps, short side
   256 + centre crop) against an `ffmpeg` subprocess per clip (Debian's ffmpeg) that
   selects the same source frames with the same area filter and crop and pipes rgb24
   out. Both single-threaded per clip, timed alternately; the frames are compared first
   so the two sides provably do the same work.
2. job: end-to-end clips/s of `run_preprocess` (shard tasks on the local CPUs, Ray
   started before timing; the job also writes and commits the shards) with the lossless
   codec and with an AutoencoderKL of Stable Diffusion's architecture (random weights),
   against the same decode + encode stages run one clip after another in one process
   without Ray (torch free to use every core there). 256 rows each by default (the videos
   repeat as distinct rows). Before each timed job a warm-up job of one shard per worker
   runs, so the ratio is the steady state of a long job; what the warm-up cost beyond the
   same clips in one process is reported as the cold start (worker imports, codec build). The VAE run samples 64x64 frames (`--vae-resolution`): at
   256^2 one CPU clip takes seconds and 256 of them would take most of an hour.

Videos are synthetic 596x336 H.264 at 24 fps (WebVid's typical size), 5 s long. Ends with
one JSON line of the figures.

    python -m bench.decode [--clips 8] [--job-clips 256] [--vae-clips 256] [--no-vae]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import tempfile
import time

import numpy as np

from bench.common import print_table, row, time_pair
from data_tools.decode import SamplingSpec, decode_clip, resized_size
from data_tools.synth import BACKGROUND, ShapeMotion, draw_motion, write_csv, write_video

WIDTH, HEIGHT, FPS, SECONDS = 596, 336, 24, 5
SPEC = SamplingSpec(num_frames=16, fps=4.0, resolution=256, threads=1)


def make_videos(folder: str, n: int) -> list[str]:
    """n WebVid-sized videos of a moving shape (square render padded to 596 wide)."""
    colours, directions = ("red", "green", "blue", "yellow"), ("left", "right", "up", "down")
    paths = []
    for i in range(n):
        motion = ShapeMotion("circle" if i % 2 else "square", colours[i % 4], directions[i % 4], 0.5)
        square = draw_motion(motion, HEIGHT, FPS * SECONDS)
        pad = (WIDTH - HEIGHT) // 2
        frames = np.empty((square.shape[0], HEIGHT, WIDTH, 3), np.uint8)
        frames[:] = BACKGROUND
        frames[:, :, pad:pad + HEIGHT] = square
        paths.append(write_video(frames, os.path.join(folder, f"{i}.mp4"), fps=FPS, codec="libx264"))
    return paths


def ffmpeg_clip(path: str, spec: SamplingSpec = SPEC) -> np.ndarray:
    """The same clip through the ffmpeg CLI: uint8 [F, R, R, 3]."""
    step = round(FPS / spec.fps)  # source frames per sampled frame (exact for 24 -> 4 fps)
    w, h = resized_size(WIDTH, HEIGHT, spec.resolution)
    r = spec.resolution
    vf = f"select='not(mod(n\\,{step}))',scale={w}:{h}:flags=area,crop={r}:{r}"
    out = subprocess.run(
        ["ffmpeg", "-v", "error", "-threads", "1", "-i", path, "-vf", vf, "-fps_mode", "passthrough",
         "-frames:v", str(spec.num_frames), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
        check=True, capture_output=True).stdout
    return np.frombuffer(out, np.uint8).reshape(spec.num_frames, r, r, 3)


def bench_decode(paths: list[str], iters: int) -> list[dict]:
    ours = [decode_clip(p, SPEC).frames for p in paths]
    theirs = [ffmpeg_clip(p) for p in paths]
    diff = max(float(np.abs(a.astype(int) - b).mean()) for a, b in zip(ours, theirs))
    print(f"decode: ours vs ffmpeg frames, worst mean |diff| = {diff:.2f} / 255 "
          f"({SPEC.num_frames} frames of {SPEC.resolution}^2 per clip)")
    if diff > 4:
        raise RuntimeError(f"ours and ffmpeg decode different frames (mean |diff| {diff:.1f})")
    t_ours, t_ffmpeg = time_pair(lambda: [decode_clip(p, SPEC) for p in paths],
                                 lambda: [ffmpeg_clip(p) for p in paths], warmup=1, iters=iters)
    n = len(paths)
    return [row("decode", "clips/s (16x256^2, 1 thread)", n / t_ours, "ffmpeg CLI subprocess", n / t_ffmpeg)]


def _job_configs(csv_path: str, out: str, codec_kind: str, model_dir: str | None, spec: SamplingSpec):
    from trip.config import CodecConfig, PreprocessConfig

    pre = PreprocessConfig(csv=csv_path, output=out, num_frames=spec.num_frames, fps=spec.fps,
                           resolution=spec.resolution, samples_per_shard=16, encode_batch_size=16)
    codec = (CodecConfig(kind="lossless", downscale=8) if codec_kind == "lossless"
             else CodecConfig(kind="vae", path=model_dir))
    return pre, codec


def _in_process(paths: list[str], codec, spec: SamplingSpec) -> None:
    """The baseline: decode and encode every clip one after another in this process."""
    from data_tools.encode import ClipEncoder

    encoder = ClipEncoder(codec, batch_size=16, device="cpu")
    for p in paths:
        encoder.encode_frames(decode_clip(p, spec).frames[None])


def bench_job(folder: str, paths: list[str], codec_kind: str, model_dir: str | None,
              spec: SamplingSpec = SPEC) -> dict:
    """Time the job and the in-process baseline on `paths` (a file may repeat as distinct rows)."""
    from pipelines.preprocess import run_preprocess

    rows = [{"videoid": str(i), "contentUrl": p, "duration": f"PT{SECONDS}S", "page_dir": "b",
             "name": f"clip {i}"} for i, p in enumerate(paths)]
    csv_path = write_csv(os.path.join(folder, f"{codec_kind}.csv"), rows)
    out = os.path.join(folder, f"out-{codec_kind}")
    pre, codec = _job_configs(csv_path, out, codec_kind, model_dir, spec)
    # Warm-up: one shard per worker, so that the timed job runs on workers that have
    # imported torch, PyAV and the codec (~5 s each on this machine, paid once per worker
    # in a real job of millions of clips); its time is reported as the cold-start cost.
    warm_rows = 2 * pre.samples_per_shard
    warm_csv = write_csv(os.path.join(folder, f"{codec_kind}-warmup.csv"), rows[:warm_rows])
    t0 = time.perf_counter()
    run_preprocess(dataclasses.replace(pre, csv=warm_csv, output=out + "-warmup"), codec, progress=False)
    t_warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    _in_process(paths[:warm_rows], codec, spec)
    t_warm_base = time.perf_counter() - t0
    t0 = time.perf_counter()
    _in_process(paths, codec, spec)
    t_base = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    result = run_preprocess(pre, codec, progress=False)
    t_job = time.perf_counter() - t0
    assert result.ok == len(paths), result
    n = len(paths)
    label = "lossless" if codec_kind == "lossless" else "SD-size VAE"
    print(f"{label}: warm-up job of {warm_rows} clips {t_warm:.1f} s (in one process: {t_warm_base:.1f} s)")
    return {**row(f"preprocess job ({label}, {n} clips, {spec.resolution}^2)", "clips/s (Ray tasks, CPU)",
                  n / t_job, "same stages in one process", n / t_base),
            "cold_start_s": t_warm - t_warm_base}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clips", type=int, default=8, help="distinct videos (the decode comparison)")
    ap.add_argument("--job-clips", type=int, default=256, help="rows for the lossless job (videos repeat)")
    ap.add_argument("--vae-clips", type=int, default=256, help="rows for the SD-size VAE job (videos repeat)")
    ap.add_argument("--vae-resolution", type=int, default=64, help="frame size of the VAE job")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--no-vae", action="store_true", help="skip the SD-size VAE job")
    args = ap.parse_args(argv)
    if shutil.which("ffmpeg") is None:
        raise SystemExit("bench.decode needs the ffmpeg CLI (Debian: apt-get install ffmpeg)")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        paths = make_videos(folder, args.clips)
        rows += bench_decode(paths, args.iters)
        from pipelines.preprocess import ray_session

        with ray_session():  # started once, outside the timed region
            job_paths = [paths[i % len(paths)] for i in range(args.job_clips)]
            rows.append(bench_job(folder, job_paths, "lossless", None))
            if not args.no_vae:
                from data_tools.models import SD_VAE_BLOCKS, save_random_vae

                model_dir = save_random_vae(os.path.join(folder, "sd-vae"), block_out_channels=SD_VAE_BLOCKS,
                                            latent_channels=4, layers_per_block=2, norm_num_groups=32)
                vae_paths = [paths[i % len(paths)] for i in range(args.vae_clips)]
                rows.append(bench_job(folder, vae_paths, "vae", model_dir,
                                      dataclasses.replace(SPEC, resolution=args.vae_resolution)))
    print_table(rows)
    figures = {"decode_ratio_vs_ffmpeg": rows[0]["ratio"]}
    for r, key in zip(rows[1:], ("lossless", "vae"), strict=False):
        figures[f"job_ratio_{key}"] = r["ratio"]
        figures[f"job_cold_start_s_{key}"] = r["cold_start_s"]
    print(json.dumps({"bench": "decode", **{k: round(v, 3) for k, v in figures.items()}}))
    return rows


if __name__ == "__main__":
    main()
