"""What the training stack costs on top of bare DeepSpeed, and what a checkpoint costs on
top of moving its bytes.

1. Step time of the full stack (`pipelines.train.run_training`: Ray Train workers, the
   streaming loader over local shards, metrics, EMA) against a bare DeepSpeed ZeRO-3 loop
   launched with torchrun (`bench.bare_deepspeed`: same model, DeepSpeed config, batch and
   ranks, one in-memory batch). Steady state: the first SKIP steps (JIT, warmup, Ray's
   start-up) are left out; medians.
   A third arm runs the bare loop inside Ray Train workers. It splits the gap in two: what
   Ray's processes cost (bare in Ray / bare under torchrun) and what the stack's own code
   costs (full stack / bare in Ray).
   This is measured at two worker counts. With as many ranks as cores (2 on a 2-core
   machine) the ranks saturate the CPUs and every wake-up of Ray's own processes (GCS,
   raylet, driver, the Train controller and its actors) takes time from a rank. With one
   rank and a core left over, those processes run beside the rank, as they do on a GPU
   node whose CPUs are not the bottleneck.
2. Checkpoint: save + upload seconds of the stack (DeepSpeed files, gathered weights and
   EMA, report to Ray, into a moto S3 server) against a raw s3fs put of the same bytes.

    python -m bench.train_overhead [--steps 40] [--workers 2 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import free_port, print_table, row

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "pipelines" / "configs" / "tiny_cpu.yaml"
SKIP = 8  # steps left out of the steady state (JIT, allocator warmup, Ray start-up)


def _steady(times: list[float]) -> float:
    return statistics.median(times[SKIP:] if len(times) > SKIP + 2 else times)


def torchrun_step_seconds(workers: int, steps: int) -> float:
    """The bare loop under torchrun."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(workers),
                          "--master_port", str(free_port()), "-m", "bench.bare_deepspeed", str(TINY), str(steps)],
                         env=env, cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"bare DeepSpeed under torchrun failed:\n{out.stderr[-3000:]}")
    line = next(x for x in out.stdout.splitlines() if x.startswith("BARE_TIMES"))
    return _steady(json.loads(line.split(" ", 1)[1]))


def ray_bare_step_seconds(workers: int, steps: int, workdir: str) -> float:
    """The same bare loop inside Ray Train workers (gloo, one CPU each, like the stack)."""
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from bench.bare_deepspeed import ray_train_loop

    out = os.path.join(workdir, f"ray-bare-{workers}.json")
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    try:
        TorchTrainer(ray_train_loop,
                     train_loop_config={"config": str(TINY), "overrides": [], "steps": steps, "out": out},
                     torch_config=TorchConfig(backend="gloo"),
                     scaling_config=ray.train.ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
                     run_config=ray.train.RunConfig(name=f"ray-bare-{workers}",
                                                    storage_path=os.path.join(workdir, "ray-bare"))).fit()
    finally:
        ray.shutdown()
    with open(out) as fh:
        return _steady(json.load(fh))


def stack_run(workers: int, steps: int, workdir: str, bucket: str) -> dict:
    """The full stack: `run_training` on synthetic shards, checkpoint into `bucket` at the end."""
    import ray

    from pipelines.train import run_training
    from trip import storage
    from trip.config import load_config
    from trip.data.synth import write_synthetic_dataset

    data = os.path.join(workdir, "data")
    if not os.path.exists(data):
        write_synthetic_dataset(data, [16] * 4, latent_shape=(8, 192, 4, 4), text_shape=None)
    name = f"bench-{workers}"
    cfg = load_config(TINY, [f"data.dataset={data}", f"run.storage_path={bucket}/runs", f"run.name={name}",
                             f"scaling.num_workers={workers}", f"train.max_steps={steps}",
                             f"train.checkpoint_every={steps}", f"train.log_every={steps}", "data.num_workers=1",
                             f"run.output_dir={workdir}/out-{workers}"])
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    try:
        res = run_training(cfg)
    finally:
        ray.shutdown()
    summary = json.loads(storage.read_bytes(res.summary))
    meta = json.loads(storage.read_bytes(storage.join(res.checkpoint, "trip_checkpoint.json")))
    ends = [h["time"] for h in meta["history"]]
    return {"step_seconds": _steady([b - a for a, b in zip(ends, ends[1:])]),
            "save_seconds": summary["checkpoint_save_seconds"][-1], "checkpoint": res.checkpoint}


def raw_put_seconds(checkpoint: str) -> tuple[float, int]:
    """s3fs put of a blob as large as the checkpoint, file by file like the stack does."""
    from trip import storage

    fs, root = storage.filesystem(checkpoint)
    blobs = [os.urandom(fs.info(p)["size"]) for p in fs.find(root)]  # made before the clock starts
    t0 = time.perf_counter()
    for i, blob in enumerate(blobs):
        fs.pipe_file(f"{root}-raw/{i}", blob)
    return time.perf_counter() - t0, sum(len(b) for b in blobs)


def main(steps: int = 40, workers: tuple[int, ...] = (2, 1)) -> list[dict]:
    from moto.server import ThreadedMotoServer

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "trip-torch-extensions"))
    cores = os.cpu_count() or 1
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    rows, speed = [], []
    try:
        import s3fs

        s3fs.S3FileSystem(endpoint_url=os.environ["AWS_ENDPOINT_URL"]).mkdir("bench")
        with tempfile.TemporaryDirectory() as work:
            for n in workers:
                where = (f"{n} workers on {cores} cores" if n >= cores else
                         f"{n} worker{'s' if n > 1 else ''}, {cores - n} core{'s' if cores - n > 1 else ''} spare")
                bare = torchrun_step_seconds(n, steps)
                in_ray = ray_bare_step_seconds(n, steps, work)
                stack = stack_run(n, steps, work, "s3://bench")
                rows += [
                    row("train_overhead", f"step s, full stack ({where})", stack["step_seconds"],
                        "bare DeepSpeed, torchrun", bare),
                    row("train_overhead", f"step s, full stack ({where})", stack["step_seconds"],
                        "bare DeepSpeed in Ray Train", in_ray),
                    row("train_overhead", f"step s, bare in Ray Train ({where})", in_ray,
                        "bare DeepSpeed, torchrun", bare),
                ]
                speed.append((where, bare / stack["step_seconds"], in_ray / stack["step_seconds"],
                              bare / in_ray))
                if n == workers[0]:
                    raw, nbytes = raw_put_seconds(stack["checkpoint"])
                    print(f"checkpoint: {nbytes / 1e6:.1f} MB")
                    rows.append(row("train_overhead", "checkpoint save+upload seconds", stack["save_seconds"],
                                    "raw s3fs put, same bytes", raw))
    finally:
        server.stop()
    print("steps/s ratios (target: full stack / torchrun >= 0.95):")
    for where, total, own, ray_cost in speed:
        print(f"  {where}: full stack / torchrun {total:.3f} = Ray's processes {ray_cost:.3f}"
              f" x stack's own code {own:.3f}")
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40, help=f"optimizer steps per arm (the first {SKIP} are warmup)")
    ap.add_argument("--workers", type=int, nargs="+", default=[2, 1], help="worker counts to measure")
    a = ap.parse_args()
    print_table(main(a.steps, tuple(a.workers)))
