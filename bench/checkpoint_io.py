"""What a checkpoint costs the training step, and what a resume reads per rank.

On W = 2 and 4 CPU ranks (Ray Train + DeepSpeed ZeRO-3, tiny model), checkpoints go into a
moto S3 server on 127.0.0.1 (the dataset is on local disk, so the S3 traffic is checkpoint
traffic only): directly for the run whose pauses are measured, through a byte-counting
proxy (`tests.s3proxy`) for the resume.

1. Stall: the seconds the training step is blocked per checkpoint (the slowest rank's, the
   run's own `checkpoint_pause_seconds_slowest_rank`; the final save, which waits for its
   upload, is left out) against a raw s3fs put of the same checkpoint's files from one
   process (`fs.put`, the same bytes, median of 3). Target: <= 0.25. The code before the
   asynchronous writer took 0.65 s against 0.28 s for the same bytes (2.3x).
2. Resume bytes: a second run with the same name resumes at the same world size; the bytes
   each worker process received from S3 (counted on the wire) divided by what that rank
   needs, its own ZeRO files + its EMA slice + the commit record. Target: <= 1.1. Before,
   every rank downloaded the whole checkpoint: W x its share plus the full weights and EMA.

    python -m bench.checkpoint_io [--ranks 2 4] [--steps 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import free_port, print_table, row

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "pipelines" / "configs" / "tiny_cpu.yaml"


def _config(data: str, storage: str, name: str, world: int, steps: int, debug_dir: str):
    from trip.config import load_config

    return load_config(TINY, [f"data.dataset={data}", f"run.storage_path={storage}", f"run.name={name}",
                              f"scaling.num_workers={world}", f"train.max_steps={steps}",
                              "train.checkpoint_every=2", f"train.log_every={steps}", "metrics.port=0",
                              f"run.output_dir={debug_dir}/out-{name}"])


def raw_put_seconds(found, work: str, rounds: int, endpoint: str) -> tuple[float, int]:
    """Median seconds of one s3fs `put` of the checkpoint's own files (the same bytes),
    straight to the S3 server at `endpoint`."""
    import s3fs

    from trip.train.checkpoint import RunDir

    run, _ = RunDir.of_checkpoint(found.url)
    local = os.path.join(work, f"raw-{found.step}")
    nbytes = run.download(found.step, list(found.record["files"]), local)
    fs, root = s3fs.S3FileSystem(endpoint_url=endpoint), found.url.removeprefix("s3://")
    times = []
    for i in range(rounds):
        t0 = time.perf_counter()
        fs.put(local.rstrip("/") + "/", f"{root}-raw{i}/", recursive=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), nbytes


def measure(world: int, steps: int, rounds: int, work: str, proxy, bucket: str, direct: str) -> dict:
    import ray

    from data_tools.synth import write_synthetic_dataset
    from pipelines.train import run_training
    from trip.train import checkpoint as ckpt
    from trip.train.callbacks import RecordSteps

    data = os.path.join(work, "data")
    if not os.path.exists(data):
        write_synthetic_dataset(data, [16] * 4, latent_shape=(8, 192, 4, 4), text_shape=None)
    debug = os.path.join(work, f"debug-{world}")
    record = [RecordSteps(debug)]  # worker pids, to attribute bytes on the wire
    name, storage = f"io-{world}", f"{bucket}/runs"
    ray.init(num_cpus=world, include_dashboard=False, log_to_driver=False)
    try:
        # the first run talks to the S3 server directly, as the raw put does; the resume goes
        # through the proxy, which counts what each worker process downloads
        os.environ["AWS_ENDPOINT_URL"] = direct
        first = run_training(_config(data, storage, name, world, steps, work), record)
        os.environ["AWS_ENDPOINT_URL"] = proxy.endpoint
        proxy.reset()
        resumed = run_training(_config(data, storage, name, world, steps + 2, work), record)
    finally:
        ray.shutdown()
    assert first.steps == steps and resumed.steps == steps + 2, (first, resumed)
    run = ckpt.RunDir(storage, name)
    found = ckpt.Found(steps, run.checkpoint_url(steps), run.record(steps))
    record_bytes = len(json.dumps(found.record).encode())
    ratios = []
    for r in range(world):
        pid = json.loads(Path(debug, f"worker-rank{r}.json").read_text())["pid"]
        own = sum(found.record["files"][f] for f in ckpt.own_files(found.record, r))
        ratios.append(proxy.down_bytes[pid] / (own + record_bytes))
    stalls = first.metrics["checkpoint_pause_seconds_slowest_rank"]
    put, nbytes = raw_put_seconds(found, work, rounds, direct)
    return {"stall": statistics.median(stalls), "stalls": stalls, "put": put, "bytes": nbytes,
            "resume_ratios": ratios}


def main(ranks: tuple[int, ...] = (2, 4), steps: int = 8, rounds: int = 3) -> list[dict]:
    from moto.server import ThreadedMotoServer

    from tests.s3proxy import S3Proxy

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "trip-torch-extensions"))
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    proxy = S3Proxy(port)
    os.environ.update(AWS_ENDPOINT_URL=proxy.endpoint, AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    rows, figures = [], {}
    try:
        import s3fs

        s3fs.S3FileSystem(endpoint_url=proxy.endpoint).mkdir("bench-io")
        with tempfile.TemporaryDirectory() as work:
            for w in ranks:
                got = measure(w, steps, rounds, work, proxy, "s3://bench-io", f"http://127.0.0.1:{port}")
                print(f"[checkpoint_io] W={w}: checkpoint {got['bytes'] / 1e6:.1f} MB, training paused "
                      f"{got['stall']:.3f} s (slowest rank; per checkpoint {[round(s, 3) for s in got['stalls']]}), "
                      f"raw put {got['put']:.3f} s; resume read / own bytes per rank "
                      f"{[round(x, 3) for x in got['resume_ratios']]}", flush=True)
                rows += [row("checkpoint_io", f"training pause per checkpoint, s (W={w})", got["stall"],
                             "raw s3fs put, same bytes", got["put"]),
                         row("checkpoint_io", f"resume bytes read by the worst rank (W={w})",
                             max(got["resume_ratios"]), "its own files + record (ratio)", 1.0)]
                figures[f"stall_ratio_w{w}"] = got["stall"] / got["put"]
                figures[f"resume_bytes_ratio_w{w}"] = max(got["resume_ratios"])
                figures[f"checkpoint_mb_w{w}"] = got["bytes"] / 1e6
    finally:
        proxy.close()
        server.stop()
    figures["stall_ratio"] = max(v for k, v in figures.items() if k.startswith("stall_ratio_w"))
    figures["resume_bytes_ratio"] = max(v for k, v in figures.items() if k.startswith("resume_bytes_ratio_w"))
    print_table(rows)
    print(json.dumps({"bench": "checkpoint_io", **{k: round(v, 4) for k, v in figures.items()}}))
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4], help="world sizes to measure")
    ap.add_argument("--steps", type=int, default=8, help="steps of the first run (a checkpoint every 2)")
    ap.add_argument("--rounds", type=int, default=3, help="raw puts per world size (median)")
    a = ap.parse_args()
    main(tuple(a.ranks), a.steps, a.rounds)
