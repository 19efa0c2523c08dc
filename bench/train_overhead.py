"""What the training stack costs on top of bare DeepSpeed.

1. Step time of the full stack (`pipelines.train.run_training`: Ray Train workers, the
   streaming loader over local shards, metrics, EMA) against a bare DeepSpeed ZeRO-3 loop
   launched with torchrun (`bench.bare_deepspeed`: same model, DeepSpeed config, batch and
   ranks, one in-memory batch). Steady state: the first SKIP steps (JIT, warmup, Ray's
   start-up) are left out; medians.
   A third arm runs the bare loop inside Ray Train workers. It splits the gap in two: what
   Ray's processes cost (bare in Ray / bare under torchrun) and what the stack's own code
   costs (full stack / bare in Ray).
   Two ranks in lockstep on two cores vary a lot from run to run (step medians of the same
   arm differ by 10-25%; the ranks idle 5-25% of the time waiting for each other). So the
   arms run interleaved for ROUNDS rounds, each round in a rotated order, and the table
   compares medians over rounds; the spread of the per-round ratios is printed beside it.
   While each arm runs, every process on the machine is sampled once a second: the CPU
   used by everything that is not a rank (Ray's GCS, raylet, agents, Train controller and
   helper actors, the driver; or torchrun's agent) is the launcher's background load,
   measured directly instead of inferred from noisy step times.
   This is measured at two worker counts. With as many ranks as cores (2 on a 2-core
   machine) the ranks saturate the CPUs and that background load takes time from a rank.
   With one rank and a core left over, it runs beside the rank, as it does on a GPU node
   whose CPUs are not the bottleneck.
(What a checkpoint costs the training step, against a raw put of its bytes, and what a
resume reads per rank: `bench.checkpoint_io`.)

    python -m bench.train_overhead [--steps 40] [--workers 2 1] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from bench.common import free_port, print_table, row

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "pipelines" / "configs" / "tiny_cpu.yaml"
SKIP = 8  # steps left out of the steady state (JIT, allocator warmup, Ray start-up)


def _steady(times: list[float]) -> float:
    return statistics.median(times[SKIP:] if len(times) > SKIP + 2 else times)


class BackgroundCpu:
    """Samples every process on the machine once a second while an arm runs and reports the
    cores used by everything that is not a rank, over the window in which the ranks are busy.

    `is_rank(cmdline)` picks the rank processes; their children (loader workers) count as
    ranks too. The window starts once the ranks use more than half of their cores and its
    first quarter (warmup) is left out; a process counts if it lives through the window.
    """

    def __init__(self, workers: int, is_rank: Callable[[str], bool], interval: float = 1.0) -> None:
        self.workers, self.is_rank, self.interval = workers, is_rank, interval
        self.snaps: list[tuple[float, dict[int, float], set[int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> BackgroundCpu:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            cpu, ranks = {}, set()
            for proc in psutil.process_iter():
                try:
                    times = proc.cpu_times()
                    cpu[proc.pid] = times.user + times.system
                    if self.is_rank(" ".join(proc.cmdline())):
                        ranks.add(proc.pid)
                        ranks.update(c.pid for c in proc.children(recursive=True))
                except psutil.Error:  # gone or unreadable between listing and reading
                    continue
            self.snaps.append((time.monotonic(), cpu, ranks))
            self._stop.wait(self.interval)

    def background_cores(self) -> float:
        """Cores used by non-rank processes while the ranks were busy (nan if they never were)."""
        busy = []  # i: the ranks were busy between snapshot i and i + 1
        for i, ((t0, a, ra), (t1, b, rb)) in enumerate(zip(self.snaps, self.snaps[1:])):
            rank_cores = sum(b[p] - a[p] for p in ra & rb if p in a and p in b) / (t1 - t0)
            if rank_cores > 0.5 * self.workers:
                busy.append(i)
        if len(busy) < 4:
            return float("nan")
        window = self.snaps[busy[len(busy) // 4]:busy[-1] + 2]
        (start, first, _), (end, last, _) = window[0], window[-1]
        ranks = set().union(*(r for _, _, r in window))
        used = sum(last[p] - first[p] for p in first if p in last and p not in ranks)
        return used / (end - start)


def _torchrun_rank(cmdline: str) -> bool:
    return "bench.bare_deepspeed" in cmdline and "torch.distributed.run" not in cmdline


def _ray_rank(cmdline: str) -> bool:
    return cmdline.startswith("ray::RayTrainWorker")


def torchrun_step_seconds(workers: int, steps: int) -> tuple[float, float]:
    """The bare loop under torchrun: (steady step seconds, background cores)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    with BackgroundCpu(workers, _torchrun_rank) as cpu:
        out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(workers),
                              "--master_port", str(free_port()), "-m", "bench.bare_deepspeed", str(TINY),
                              str(steps)], env=env, cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"bare DeepSpeed under torchrun failed:\n{out.stderr[-3000:]}")
    line = next(x for x in out.stdout.splitlines() if x.startswith("BARE_TIMES"))
    return _steady(json.loads(line.split(" ", 1)[1])), cpu.background_cores()


def ray_bare_step_seconds(workers: int, steps: int, workdir: str, tag: str = "") -> tuple[float, float]:
    """The same bare loop inside Ray Train workers (gloo, one CPU each, like the stack):
    (steady step seconds, background cores)."""
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from bench.bare_deepspeed import ray_train_loop

    out = os.path.join(workdir, f"ray-bare-{workers}{tag}.json")
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    try:
        with BackgroundCpu(workers, _ray_rank) as cpu:
            TorchTrainer(ray_train_loop,
                         train_loop_config={"config": str(TINY), "overrides": [], "steps": steps, "out": out},
                         torch_config=TorchConfig(backend="gloo"),
                         scaling_config=ray.train.ScalingConfig(num_workers=workers,
                                                                resources_per_worker={"CPU": 1}),
                         run_config=ray.train.RunConfig(name=f"ray-bare-{workers}{tag}",
                                                        storage_path=os.path.join(workdir, "ray-bare"))).fit()
    finally:
        ray.shutdown()
    with open(out) as fh:
        return _steady(json.load(fh)), cpu.background_cores()


def stack_run(workers: int, steps: int, workdir: str, bucket: str, tag: str = "") -> dict:
    """The full stack: `run_training` on synthetic shards, checkpoint into `bucket` at the end.
    Each call is a new run (`tag` in its name): the same name would resume the last one."""
    import ray

    from data_tools.synth import write_synthetic_dataset
    from pipelines.train import run_training
    from trip.config import load_config

    data = os.path.join(workdir, "data")
    if not os.path.exists(data):
        write_synthetic_dataset(data, [16] * 4, latent_shape=(8, 192, 4, 4), text_shape=None)
    name = f"bench-{workers}{tag}"
    cfg = load_config(TINY, [f"data.dataset={data}", f"run.storage_path={bucket}/runs", f"run.name={name}",
                             f"scaling.num_workers={workers}", f"train.max_steps={steps}",
                             f"train.checkpoint_every={steps}", f"train.log_every={steps}",
                             f"run.output_dir={workdir}/out-{name}"])
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    try:
        with BackgroundCpu(workers, _ray_rank) as cpu:
            res = run_training(cfg)
    finally:
        ray.shutdown()
    assert res.steps == steps, res
    from trip.train.checkpoint import RunDir

    ends = [h["time"] for h in RunDir(cfg.run.storage_path, cfg.run.name).history()]
    return {"step_seconds": _steady([b - a for a, b in zip(ends, ends[1:])]),
            "background_cores": cpu.background_cores()}


ARMS = ("torchrun", "ray_bare", "stack")


def measure(workers: int, steps: int, rounds: int, work: str, bucket: str) -> dict[str, list]:
    """`rounds` rounds of the three arms, each round in a rotated order so that no arm always
    runs first (or right after Ray's shutdown). Returns per-arm lists over rounds."""
    got: dict[str, list] = {k: [] for k in (*ARMS, *(f"bg_{a}" for a in ARMS))}
    for r in range(rounds):
        for arm in ARMS[r % len(ARMS):] + ARMS[:r % len(ARMS)]:
            if arm == "torchrun":
                seconds, bg = torchrun_step_seconds(workers, steps)
            elif arm == "ray_bare":
                seconds, bg = ray_bare_step_seconds(workers, steps, work, tag=f"-r{r}")
            else:
                res = stack_run(workers, steps, work, bucket, tag=f"-r{r}")
                seconds, bg = res["step_seconds"], res["background_cores"]
            got[arm].append(seconds)
            got[f"bg_{arm}"].append(bg)
            print(f"[train_overhead] {workers} worker(s), round {r + 1}/{rounds}: {arm} {seconds:.3f} s/step, "
                  f"background {bg:.3f} cores", flush=True)
    return got


def main(steps: int = 40, workers: tuple[int, ...] = (2, 1), rounds: int = 3) -> list[dict]:
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
    rows, lines = [], []
    med = statistics.median
    try:
        import s3fs

        s3fs.S3FileSystem(endpoint_url=os.environ["AWS_ENDPOINT_URL"]).mkdir("bench")
        with tempfile.TemporaryDirectory() as work:
            for n in workers:
                where = (f"{n} workers on {cores} cores" if n >= cores else
                         f"{n} worker{'s' if n > 1 else ''}, {cores - n} core{'s' if cores - n > 1 else ''} spare")
                got = measure(n, steps, rounds, work, "s3://bench")
                bare, in_ray, stack = med(got["torchrun"]), med(got["ray_bare"]), med(got["stack"])
                rows += [
                    row("train_overhead", f"step s, full stack ({where})", stack, "bare DeepSpeed, torchrun", bare),
                    row("train_overhead", f"step s, full stack ({where})", stack, "bare DeepSpeed in Ray Train",
                        in_ray),
                    row("train_overhead", f"step s, bare in Ray Train ({where})", in_ray, "bare DeepSpeed, torchrun",
                        bare),
                ]
                per_round = [b / s for b, s in zip(got["torchrun"], got["stack"])]
                lines.append(
                    f"  {where}, medians of {rounds} rounds: full stack / torchrun {bare / stack:.3f} "
                    f"(rounds {min(per_round):.3f}-{max(per_round):.3f}) = Ray's processes {bare / in_ray:.3f}"
                    f" x stack's own code {in_ray / stack:.3f}\n"
                    f"    background CPU besides the ranks (cores of {cores}): torchrun "
                    f"{med(got['bg_torchrun']):.3f}, Ray Train bare {med(got['bg_ray_bare']):.3f}, "
                    f"full stack {med(got['bg_stack']):.3f}")
    finally:
        server.stop()
    print("steps/s ratios (target: full stack / torchrun >= 0.95):")
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40, help=f"optimizer steps per arm (the first {SKIP} are warmup)")
    ap.add_argument("--workers", type=int, nargs="+", default=[2, 1], help="worker counts to measure")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the three arms (medians)")
    a = ap.parse_args()
    print_table(main(a.steps, tuple(a.workers), a.rounds))
