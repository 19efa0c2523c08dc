"""Preprocessing at WebVid-10M scale: what the job's driver costs, measured, not extrapolated
from wall time alone.

1. plan: a synthetic WebVid CSV of `--rows` rows (1M by default; WebVid-like ids, URLs,
   durations and captions, a few repeated videoids and bad lines) is planned by
   `data_tools.webvid.scan_csv` in a fresh process, which reports its peak RSS (VmHWM) and
   seconds. The baseline is the old way, every row as a Python object (`csv.DictReader` over
   the decoded file, one `VideoRow` a row), in another fresh process. The planner keeps
   ~25 bytes a record in numpy arrays, so its memory is linear with a small slope: the
   10.7M-row figures are a linear fit through two sizes (rows/4 and rows), both measured.
2. job: the real job (`run_preprocess`, a local Ray, lossless codec, tiny synthetic videos)
   on `--clips` clips; the driver's CPU seconds (user + system, all its threads, Ray's
   included) per 1000 clips, from `resource.getrusage` around the run.

    python -m bench.preprocess_scale [--rows 1000000] [--clips 256]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

from bench.common import print_table, row

WEBVID_ROWS = 10_700_000

PLAN_CHILD = """
import json, sys, time
from data_tools.webvid import scan_csv
t0 = time.perf_counter()
plan = scan_csv(sys.argv[1], min_duration=2.0)
seconds = time.perf_counter() - t0
hwm = next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM:'))
print(json.dumps({"seconds": seconds, "peak_rss": hwm, "rows": len(plan), "rejected": len(plan.rejected)}))
"""

OBJECTS_CHILD = """
import csv, io, json, sys, time
from data_tools.webvid import VideoRow, parse_duration
from trip import storage
t0 = time.perf_counter()
raw = storage.read_bytes(sys.argv[1])
rows = []
for rec in csv.DictReader(io.StringIO(raw.decode('utf-8-sig'))):
    if None in rec or not rec['videoid']:
        continue
    rows.append(VideoRow(videoid=rec['videoid'], url=rec['contentUrl'], caption=rec['name'],
                         duration=parse_duration(rec['duration']), page_dir=rec['page_dir'], extra='{}'))
seconds = time.perf_counter() - t0
hwm = next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM:'))
print(json.dumps({"seconds": seconds, "peak_rss": hwm, "rows": len(rows)}))
"""


def write_webvid_csv(path: str, rows: int, seed: int = 0) -> str:
    """A WebVid-like CSV: 8-9 digit ids, stock-footage URLs, ISO durations, 5-20 word
    captions; every 50,000th row repeats an earlier id and every 100,000th is cut short."""
    rng = random.Random(seed)
    words = ["aerial", "view", "of", "the", "city", "at", "night", "young", "woman", "smiling", "ocean",
             "waves", "slow", "motion", "close", "up", "forest", "sunset", "timelapse", "traffic"]
    with open(path, "w", newline="") as fh:
        fh.write("videoid,contentUrl,duration,page_dir,name\n")
        for i in range(rows):
            vid = 10_000_000 + i * 7 if i % 50_000 != 49_999 else 10_000_000 + (i // 2) * 7
            page = f"{rng.randrange(1000, 2000):04d}_{rng.randrange(10**7):07d}"
            cap = " ".join(rng.choice(words) for _ in range(rng.randrange(5, 21)))
            url = f"https://ak.picdn.net/shutterstock/videos/{vid}/preview/stock-footage-{cap[:30].replace(' ', '-')}.mp4"
            if i % 100_000 == 99_999:
                fh.write(f"{vid},{url}\n")
            else:
                fh.write(f'{vid},{url},PT00H00M{rng.randrange(3, 60):02d}S,{page},"{cap}"\n')
    return path


def _child(code: str, csv_path: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    out = subprocess.run([sys.executable, "-c", code, csv_path], check=True, capture_output=True, text=True,
                         env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_plan(folder: str, rows: int, baseline: bool) -> tuple[list[dict], dict]:
    small = write_webvid_csv(os.path.join(folder, "small.csv"), rows // 4)
    big = write_webvid_csv(os.path.join(folder, "big.csv"), rows)
    a, b = _child(PLAN_CHILD, small), _child(PLAN_CHILD, big)
    slope_rss = (b["peak_rss"] - a["peak_rss"]) / (rows - rows // 4)
    slope_s = (b["seconds"] - a["seconds"]) / (rows - rows // 4)
    figures = {
        "plan_rows": rows, "plan_seconds_1m": b["seconds"] * 1e6 / rows,
        "plan_peak_rss_gb_1m": (a["peak_rss"] + slope_rss * (1e6 - rows // 4)) / 1e9,
        "plan_peak_rss_gb_10_7m": (b["peak_rss"] + slope_rss * (WEBVID_ROWS - rows)) / 1e9,
        "plan_seconds_10_7m": b["seconds"] + slope_s * (WEBVID_ROWS - rows),
        "plan_rejected": b["rejected"], "csv_mb": os.path.getsize(big) / 1e6,
    }
    out = []
    if baseline:
        o = _child(OBJECTS_CHILD, big)
        figures.update(objects_seconds_1m=o["seconds"] * 1e6 / rows, objects_peak_rss_gb_1m=o["peak_rss"] * 1e6 / rows / 1e9)
        out.append(row("plan 1M rows: seconds", "s (streaming scan; lower is better)", figures["plan_seconds_1m"],
                       "every row a Python object", figures["objects_seconds_1m"]))
        out.append(row("plan 1M rows: peak RSS", "GB (streaming scan; lower is better)", figures["plan_peak_rss_gb_1m"],
                       "every row a Python object", figures["objects_peak_rss_gb_1m"]))
    return out, figures


def bench_driver_cpu(folder: str, clips: int) -> dict:
    """Driver CPU seconds per 1000 clips during a real job (lossless codec, tiny videos)."""
    import resource

    from data_tools.synth import make_dataset, write_csv
    from pipelines.preprocess import ray_session, run_preprocess
    from trip.config import CodecConfig, PreprocessConfig

    with open(make_dataset(os.path.join(folder, "videos"), num=8, size=32, seconds=2.0)) as fh:
        import csv

        base = list(csv.DictReader(fh))
    rows = [{**base[i % len(base)], "videoid": str(100_000 + i)} for i in range(clips)]
    csv_path = write_csv(os.path.join(folder, "job.csv"), rows)
    # each row names its video by contentUrl (8 videos, each listed under many ids)
    pre = PreprocessConfig(csv=csv_path, output=os.path.join(folder, "out"), num_frames=4, resolution=16,
                           samples_per_shard=64)
    with ray_session():
        run_preprocess(PreprocessConfig(**{**pre.__dict__, "output": os.path.join(folder, "warm"), "limit": 4}),
                       CodecConfig(), progress=False)  # worker processes started outside the measurement
        before = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        result = run_preprocess(pre, CodecConfig(), progress=False)
        seconds = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"job_clips": clips, "job_ok": result.ok, "job_seconds": seconds,
            "driver_cpu_s": cpu, "driver_cpu_s_per_1000_clips": cpu * 1000 / max(1, clips)}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="rows of the synthetic CSV planned")
    ap.add_argument("--clips", type=int, default=256, help="clips of the job whose driver CPU is measured")
    ap.add_argument("--no-baseline", action="store_true", help="skip the rows-as-objects baseline")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        rows, figures = bench_plan(folder, args.rows, not args.no_baseline)
        figures.update(bench_driver_cpu(folder, args.clips))
    rows.append(row("driver CPU per 1000 clips", "s (lower is better)", figures["driver_cpu_s_per_1000_clips"],
                    "target", 0.5))
    print_table(rows)
    print(json.dumps({"bench": "preprocess_scale", **{k: round(v, 4) if isinstance(v, float) else v
                                                      for k, v in figures.items()}}))
    return rows


if __name__ == "__main__":
    main()
