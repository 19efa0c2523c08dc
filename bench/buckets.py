"""What bucketing buys and what it costs: pixels kept, compute spent on padding, loader speed.

1. Pixels kept. A synthetic WebVid-like corpus of clip sizes and lengths (the mix below is
   an assumption, not a measurement of WebVid: mostly 16:9 landscape, some 4:3, portrait
   9:16 and square, 2-30 s) is assigned to the buckets of `pipelines/configs/buckets_256.yaml`
   (16:9, 1:1, 9:16 at ~256^2 pixels, 8 or 16 frames, bucket_max_crop 0.25) by the
   preprocessing rule (`data_tools.buckets.assign_bucket`). The fraction of each frame's
   pixels that survive the crop is compared with centre-cropping every clip to a square.
2. Compute on padding, at the paper's scale (the corpus scaled to 10.7M clips, 512 ranks,
   global batch 4096, data.uneven=pad): the bucketed loader's padded slots are only the last
   round of each bucket (`Split` arithmetic), against the other way to batch mixed shapes
   without cropping, padding every clip to the largest bucket (latent elements).
3. The exactly-once state at scale: 10.7M clips in those buckets, resized 512 <-> 384 ranks
   x 8 units after every `--steps` rounds for a whole epoch, with the real plan and merge
   code: the most ranges the state holds (about ranks x units x buckets, however many
   resumes), the merge seconds and the seconds a rank spends planning a pass.
4. Loader speed: `LatentLoader` samples/s over a 3-bucket dataset against the same loader
   over a one-bucket dataset with the same sample count and bytes per sample (2 DataLoader
   workers, batch 8, one epoch per timing, the two timed alternately; target >= 0.95).

    python -m bench.buckets [--clips 20000] [--samples 768] [--iters 3]

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import print_table, row, time_pair

# (width, height, share) of source frames: an assumed WebVid-like mix
SOURCES = [(1280, 720, 0.45), (1920, 1080, 0.15), (640, 360, 0.10), (640, 480, 0.10),
           (720, 1280, 0.10), (1080, 1920, 0.04), (1080, 1080, 0.05), (1440, 1080, 0.01)]
CONFIG = Path(__file__).resolve().parents[1] / "pipelines" / "configs" / "buckets_256.yaml"


def corpus(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Widths, heights and durations (s) of n clips."""
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(SOURCES), size=n, p=[s[2] for s in SOURCES])
    w = np.array([SOURCES[i][0] for i in pick])
    h = np.array([SOURCES[i][1] for i in pick])
    return w, h, rng.uniform(2.0, 30.0, size=n)


def pixels_kept(n: int) -> dict:
    from data_tools.buckets import assign_bucket, config_buckets, sampling_words
    from trip.config import load_config

    pre = load_config(CONFIG).preprocess
    buckets = config_buckets(pre)
    w, h, seconds = corpus(n)
    frames = np.floor((seconds - pre.start_offset) * pre.fps).astype(int)
    counts = {b.name: 0 for b in buckets}
    kept_bucketed, dropped = [], 0
    for wi, hi, fi in zip(w.tolist(), h.tolist(), frames.tolist()):
        a = assign_bucket(wi, hi, fi, buckets, max_crop=pre.bucket_max_crop, sampling=sampling_words(pre.fps, None))
        if a.bucket is None:
            dropped += 1
            continue
        counts[a.bucket.name] += 1
        kept_bucketed.append(1.0 - a.crop)
    square = np.minimum(w, h) ** 2 / (w * h)  # centre crop to a square keeps min(w,h)^2 of w*h
    shapes = {b.name: (b.frames, b.height // 8, b.width // 8) for b in buckets}  # latent F, h, w (VAE /8)
    return {"clips": n, "buckets": counts, "dropped": dropped, "shapes": shapes,
            "kept_bucketed": float(np.mean(kept_bucketed)), "kept_square": float(square.mean()),
            "kept_bucketed_counting_dropped_as_0": float(np.sum(kept_bucketed) / n)}


def padding(counts: dict[str, int], shapes: dict[str, tuple[int, int, int]], total: int, world: int,
            global_batch: int) -> dict:
    from trip.data.plan import Split

    n = sum(counts.values())
    scaled = {k: round(v * total / n) for k, v in counts.items()}
    elems = {k: math.prod(s) for k, s in shapes.items()}
    slots = pad = slot_elems = pad_elems = 0
    for name, count in scaled.items():
        if not count:
            continue
        sp = Split(remaining=count, world_size=world, batch_size=global_batch // world, pad=True,
                   round_size=global_batch)
        s = sp.num_rounds * sp.per_round
        slots, pad = slots + s, pad + s - count
        slot_elems, pad_elems = slot_elems + s * elems[name], pad_elems + (s - count) * elems[name]
    largest = max(elems[k] for k, v in scaled.items() if v)
    real = sum(v * elems[k] for k, v in scaled.items())
    return {"clips": sum(scaled.values()), "world_size": world, "global_batch": global_batch,
            "bucketed_pad_slot_fraction": pad / slots, "bucketed_pad_compute_fraction": pad_elems / slot_elems,
            "pad_to_largest_compute_fraction": 1.0 - real / (sum(scaled.values()) * largest)}


def state_at_scale(counts: dict[str, int], total: int, chain: list[int], units: int, steps: int,
                   global_batch: int = 4096) -> dict:
    """The exactly-once state of a bucketed epoch along a resize chain at full scale, with the
    real plan code (positions only, no shards): each pass every rank delivers `steps` rounds
    (`BucketPlan.delivered`), the ranks' deliveries are merged into the global position set,
    and the next pass resumes from it at the next world size. Reports the ranges of the
    state after each pass and the seconds one rank spends planning a pass."""
    from trip.data.plan import BucketPlan, Intervals, Split, bucket_schedule

    n = sum(counts.values())
    sizes = [round(v * total / n) for v in counts.values() if v]
    offsets = np.concatenate(([0], np.cumsum(sizes)))
    consumed = Intervals()
    passes = []
    for world in chain:
        remaining = [consumed.window(offsets[b], offsets[b + 1]).complement(size) for b, size in enumerate(sizes)]
        splits = [Split(remaining=len(r), world_size=world, batch_size=global_batch // chain[0], pad=False,
                        round_size=global_batch, micro_batches=2) for r in remaining]
        schedule = bucket_schedule([sp.num_rounds for sp in splits], seed=0, epoch=0)
        t0 = time.perf_counter()
        plans = [BucketPlan(remaining, splits, rank, units, schedule) for rank in range(world)]
        plan_s = (time.perf_counter() - t0) / world
        own = []
        for plan in plans:
            for b, got in enumerate(plan.delivered(steps)):
                own.append(got.shifted(int(offsets[b])))
        t0 = time.perf_counter()
        consumed = Intervals.union_all([consumed, *own])
        merge_s = time.perf_counter() - t0
        passes.append({"world_size": world, "delivered": len(consumed), "state_ranges": consumed.num_ranges,
                       "state_json_bytes": len(json.dumps(consumed.to_list())),
                       "ranks_x_units_x_buckets": world * units * len(sizes),
                       "plan_seconds_per_rank": plan_s, "merge_seconds": merge_s})
    peak = max(passes, key=lambda p: p["state_ranges"])
    return {"samples": int(sum(sizes)), "buckets": len(sizes), "units": units, "steps_per_pass": steps,
            "peak_state_ranges": peak["state_ranges"], "peak_state_json_bytes": peak["state_json_bytes"],
            "peak_over_ranks_x_units_x_buckets": peak["state_ranges"] / (max(chain) * units * len(sizes)),
            "max_merge_seconds": max(p["merge_seconds"] for p in passes),
            "max_plan_seconds_per_rank": max(p["plan_seconds_per_rank"] for p in passes), "passes": passes}


def loader_speed(samples: int, iters: int) -> dict:
    from data_tools.synth import write_synthetic_buckets, write_synthetic_dataset
    from trip.config import DataConfig
    from trip.data import LatentLoader

    per_shard = 32
    shapes = {"32x32x8": (8, 4, 32, 32), "16x32x16": (16, 4, 16, 32), "32x16x16": (16, 4, 32, 16)}
    per_bucket = samples // len(shapes) // per_shard
    with tempfile.TemporaryDirectory() as tmp:
        single, bucketed = os.path.join(tmp, "single"), os.path.join(tmp, "bucketed")
        write_synthetic_dataset(single, [per_shard] * per_bucket * len(shapes), latent_shape=(8, 4, 32, 32),
                                text_shape=None)
        write_synthetic_buckets(bucketed, {k: (s, [per_shard] * per_bucket) for k, s in shapes.items()},
                                text_shape=None)
        loaders = [LatentLoader(DataConfig(dataset=d, micro_batch_size=8, num_workers=2, shuffle_buffer=64,
                                           text=False), 0, 1) for d in (single, bucketed)]

        def epoch(loader: LatentLoader) -> None:
            for _ in loader:
                pass

        try:
            t_single, t_bucketed = time_pair(lambda: epoch(loaders[0]), lambda: epoch(loaders[1]),
                                             warmup=1, iters=iters)
        finally:
            for lo in loaders:
                lo.close()
        n = per_bucket * per_shard * len(shapes)
    return {"samples": n, "single_samples_per_s": n / t_single, "bucketed_samples_per_s": n / t_bucketed,
            "ratio": t_single / t_bucketed}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clips", type=int, default=20000, help="clips in the synthetic corpus")
    ap.add_argument("--samples", type=int, default=768, help="samples in each loader dataset")
    ap.add_argument("--iters", type=int, default=3, help="timed epochs per loader")
    ap.add_argument("--steps", type=int, default=100, help="rounds per pass of the resize chain at scale")
    args = ap.parse_args(argv)
    kept = pixels_kept(args.clips)
    pad = padding(kept["buckets"], kept["shapes"], total=10_700_000, world=512, global_batch=4096)
    chain = [512, 384] * (-(-10_700_000 // (4096 * args.steps)) // 2 + 1)  # resized every pass, a whole epoch
    scale = state_at_scale(kept["buckets"], total=10_700_000, chain=chain, units=8, steps=args.steps)
    print(f"state along {len(chain)} passes of {args.steps} steps at 512/384 ranks x 8 units x {scale['buckets']} "
          f"buckets: peak {scale['peak_state_ranges']} ranges ({scale['peak_state_json_bytes'] / 1e3:.0f} KB, "
          f"{scale['peak_over_ranks_x_units_x_buckets']:.2f} x ranks x units x buckets), merge <= "
          f"{scale['max_merge_seconds']:.3f} s, plan <= {scale['max_plan_seconds_per_rank'] * 1e3:.1f} ms per rank")
    speed = loader_speed(args.samples, args.iters)
    rows = [
        row("buckets/pixels", "fraction of frame pixels kept", kept["kept_bucketed"], "centre crop to square",
            kept["kept_square"]),
        row("buckets/padding", "compute on padding (10.7M clips, W=512)", pad["bucketed_pad_compute_fraction"],
            "pad to the largest bucket", pad["pad_to_largest_compute_fraction"]),
        row("buckets/loader", "samples/s", speed["bucketed_samples_per_s"], "one-bucket loader",
            speed["single_samples_per_s"]),
    ]
    print_table(rows)
    print(f"clips per bucket: {kept['buckets']}; fitting no bucket: {kept['dropped']} of {kept['clips']}")
    print(json.dumps({"benchmark": "buckets", "pixels": kept, "padding": pad, "state_at_scale": scale,
                      "loader": speed}), flush=True)
    return rows


if __name__ == "__main__":
    main()
