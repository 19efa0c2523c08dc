"""What the training stack costs on top of bare DeepSpeed, and what a checkpoint costs on
top of moving its bytes.

1. Step time: the full stack (`pipelines.train.run_training`: Ray Train workers, the
   streaming loader over local shards, metrics, EMA) vs a bare DeepSpeed ZeRO-3 loop
   launched with torchrun (same model, same DeepSpeed config, same 2 ranks, random
   in-memory batches). Steady state: the first steps (JIT, warmup) are left out.
2. Checkpoint: save + upload seconds of the stack (DeepSpeed files, gathered weights and
   EMA, report to Ray, into a moto S3 server) vs a raw s3fs put of the same bytes.

    python -m bench.train_overhead [--steps 16]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import print_table, row

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "pipelines" / "configs" / "tiny_cpu.yaml"
SKIP = 4  # steps left out of the steady state (JIT, allocator warmup)

BARE = r'''
import json, os, sys, time
sys.path.insert(0, os.environ["TRIP_ROOT"])
import torch, deepspeed
from trip.config import load_config
from trip.diffusion import TRIPObjective
from trip.model import TRIPModel
from trip.train.ds_config import deepspeed_config
cfg = load_config(sys.argv[1])
steps, world = int(sys.argv[2]), int(os.environ["WORLD_SIZE"])
torch.set_num_threads(1)
torch.manual_seed(0)
model = TRIPModel(cfg.model, cfg.diffusion)
g = model.param_groups()
params = [{"params": g["unet"], "lr": cfg.train.lr_unet}, {"params": g["fusion"], "lr": cfg.train.lr_fusion}]
accum = cfg.grad_accum_steps(world)
ds = deepspeed_config(cfg.train, micro_batch_size=cfg.data.micro_batch_size, grad_accum=accum,
                      world_size=world, on_gpu=False)
engine, *_ = deepspeed.initialize(model=TRIPObjective(model), model_parameters=params, config=ds)
m = cfg.model
b = cfg.data.micro_batch_size
lat = torch.randn(b, m.latent_channels, m.num_frames, m.latent_size, m.latent_size)
img = lat[:, :, 0]
times = []
for _ in range(steps):
    t0 = time.perf_counter()
    for _ in range(accum):
        loss = engine(lat, img)
        engine.backward(loss)
        engine.step()
    times.append(time.perf_counter() - t0)
if int(os.environ["RANK"]) == 0:
    print("BARE_TIMES", json.dumps(times), flush=True)
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bare_step_seconds(steps: int, workdir: str) -> float:
    script = Path(workdir) / "bare_ds.py"
    script.write_text(BARE)
    env = dict(os.environ, TRIP_ROOT=str(ROOT), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(_free_port()), str(script), str(TINY), str(steps)],
                         env=env, capture_output=True, text=True, check=True)
    line = next(x for x in out.stdout.splitlines() if x.startswith("BARE_TIMES"))
    return statistics.median(json.loads(line.split(" ", 1)[1])[SKIP:])


def stack_run(steps: int, workdir: str, bucket: str) -> dict:
    import ray

    from pipelines.train import run_training
    from trip import storage
    from trip.config import load_config
    from trip.data.synth import write_synthetic_dataset

    data = os.path.join(workdir, "data")
    write_synthetic_dataset(data, [16] * 4, latent_shape=(8, 192, 4, 4), text_shape=None)
    cfg = load_config(TINY, [f"data.dataset={data}", f"run.storage_path={bucket}/runs", "run.name=bench",
                             f"train.max_steps={steps}", f"train.checkpoint_every={steps}",
                             f"train.log_every={steps}", "data.num_workers=1", f"run.output_dir={workdir}/out"])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        res = run_training(cfg)
    finally:
        ray.shutdown()
    summary = json.loads(storage.read_bytes(res.summary))
    meta = json.loads(storage.read_bytes(storage.join(res.checkpoint, "trip_checkpoint.json")))
    times = [h["time"] for h in meta["history"]]
    step_s = statistics.median([b - a for a, b in zip(times[SKIP:], times[SKIP + 1:])][:-1] or [float("nan")])
    return {"step_seconds": step_s, "save_seconds": summary["checkpoint_save_seconds"][-1],
            "checkpoint": res.checkpoint}


def raw_put_seconds(checkpoint: str) -> tuple[float, int]:
    """s3fs put of a blob as large as the checkpoint, file by file like the stack does."""
    from trip import storage

    fs, root = storage.filesystem(checkpoint)
    sizes = [fs.info(p)["size"] for p in fs.find(root)]
    t0 = time.perf_counter()
    for i, n in enumerate(sizes):
        fs.pipe_file(f"{root}-raw/{i}", os.urandom(n))
    return time.perf_counter() - t0, sum(sizes)


def main(steps: int = 16) -> list[dict]:
    from moto.server import ThreadedMotoServer

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "trip-torch-extensions"))
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    try:
        import s3fs

        s3fs.S3FileSystem(endpoint_url=os.environ["AWS_ENDPOINT_URL"]).mkdir("bench")
        with tempfile.TemporaryDirectory() as work:
            bare = bare_step_seconds(steps, work)
            stack = stack_run(steps, work, "s3://bench")
            raw, nbytes = raw_put_seconds(stack["checkpoint"])
    finally:
        server.stop()
    print(f"checkpoint: {nbytes / 1e6:.1f} MB")
    return [
        row("train_overhead", "step seconds (full stack)", stack["step_seconds"], "bare DeepSpeed (torchrun)", bare),
        row("train_overhead", "checkpoint save+upload seconds", stack["save_seconds"], "raw s3fs put, same bytes",
            raw),
    ]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=16)
    print_table(main(ap.parse_args().steps))
