"""Fault tolerance and elasticity of `trip train`, with real Ray processes and nodes.

- SIGKILL of one worker process from outside mid-run: Ray restarts the group, the run
  resumes from the last checkpoint and finishes; every sample is trained on exactly once
  per epoch along the surviving trajectory.
- Elastic: a 2-node run loses a node (2 -> 1 worker, resumed through DeepSpeed's universal
  checkpoint) and gets it back (1 -> 2); the global batch stays 8 and data stays exactly-once.
- A shard past the corrupt limit: the run ends after its first attempt with the loader's
  `CorruptDataError` message, although `run.max_failures` would allow two restarts.

Keys come from the `RecordSteps` callback: each rank logs the keys of every step with the id
of its worker-group attempt, so steps redone after a restart are told apart.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "pipelines" / "configs" / "tiny_cpu.yaml"
SAMPLES, GLOBAL_BATCH = 32, 8
STEPS_PER_EPOCH = SAMPLES // GLOBAL_BATCH  # the same at every world size: the global batch is fixed


def rows(debug: Path) -> list[dict]:
    out = []
    for f in debug.glob("keys-rank*.jsonl"):
        out += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return out


def surviving(debug: Path) -> dict[int, list[dict]]:
    """step -> the rows of the last attempt that trained that step (earlier ones were undone)."""
    by_step: dict[int, list[dict]] = collections.defaultdict(list)
    for r in rows(debug):
        by_step[r["step"]].append(r)
    return {s: [r for r in rs if r["attempt"] == max(x["attempt"] for x in rs)] for s, rs in by_step.items()}


def assert_exactly_once(debug: Path, steps: int) -> dict[int, list[dict]]:
    final = surviving(debug)
    assert sorted(final) == list(range(1, steps + 1))
    for s, rs in final.items():
        assert sum(len(r["keys"]) for r in rs) == GLOBAL_BATCH, (s, rs)
        assert len(rs) == rs[0]["world_size"], (s, rs)
    for epoch in range(steps // STEPS_PER_EPOCH):
        seen = collections.Counter(k for s in range(epoch * STEPS_PER_EPOCH + 1, (epoch + 1) * STEPS_PER_EPOCH + 1)
                                   for r in final[s] for k in r["keys"])
        assert len(seen) == SAMPLES and set(seen.values()) == {1}, (epoch, seen)
    return final


def wait_for(cond, timeout: float, what: str) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def max_step(debug: Path, world: int | None = None) -> int:
    return max((r["step"] for r in rows(debug) if world is None or r["world_size"] == world), default=0)


def kill_rank_at(debug: Path, step: int, rank: int = 1) -> tuple[threading.Thread, list[int]]:
    """A started thread that SIGKILLs rank `rank`'s worker process once a step >= `step` is
    recorded; the list receives the pid it killed."""
    killed: list[int] = []

    def killer() -> None:
        wait_for(lambda: max_step(debug) >= step, 120, f"step {step}")
        pid = json.loads((debug / f"worker-rank{rank}.json").read_text())["pid"]
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    return thread, killed


def test_sigkill_of_a_worker_resumes_and_keeps_data_exactly_once(s3_bucket, tmp_path, monkeypatch):
    import ray

    from pipelines.train import run_training
    from tests.integration.callbacks import recording
    from tests.integration.test_train_ray import VALIDATED, make_config

    debug = tmp_path / "debug"
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "trip-torch-extensions"))
    validated: list[int] = []
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        t, killed = kill_rank_at(debug, 3)
        # bf16 here: the precision does not change the fault handling, and the path gets run
        # validated every 2 steps across the kill: each validation step once, none lost
        res = run_training(make_config(s3_bucket, "killed", 8, **{"run.max_failures": 2, "train.precision": "bf16"},
                                       **VALIDATED),
                           recording(debug, slow=0.3), on_validation=lambda step, f: validated.append(step))
        t.join(5)
    finally:
        ray.shutdown()
    assert killed, "the worker was never killed"
    assert res.steps == 8
    final = assert_exactly_once(debug, 8)
    assert len({r["attempt"] for r in rows(debug)}) == 2  # one restart
    first, second = sorted({r["attempt"] for r in rows(debug)})
    resumed_at = min(r["step"] for r in rows(debug) if r["attempt"] == second) - 1
    assert resumed_at >= 2 and resumed_at % 2 == 0, resumed_at  # from a checkpoint, not from scratch
    assert final[resumed_at][0]["attempt"] == first and final[8][0]["attempt"] == second
    assert validated == [2, 4, 6, 8], validated
    from trip.train.checkpoint import RunDir

    run = RunDir(f"{s3_bucket}/runs", "killed")
    assert all(run.validated(step) for step in (2, 4, 6, 8))


def test_elastic_shrink_and_grow_keep_global_batch_and_exactly_once(s3_bucket, tmp_path, monkeypatch):
    from ray.cluster_utils import Cluster

    from pipelines.train import validate
    from tests.integration.test_train_ray import make_config

    # Enough steps that the group can grow back (resize check + restart, ~15 s on a loaded
    # 2-core machine) before the run ends, whenever the shrink happened.
    STEPS = 40  # noqa: N806
    debug = tmp_path / "debug"
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "5")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "trip-torch-extensions"))
    cfg = make_config(s3_bucket, "elastic", STEPS, **{"scaling.min_workers": 1, "scaling.max_workers": 2,
                                                    "scaling.resize_check_s": 1.0, "run.max_failures": 4})
    validate(cfg)  # also writes the dataset
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    sets = [f"{k}={v}" for k, v in {
        "data.dataset": cfg.data.dataset, "run.storage_path": cfg.run.storage_path, "run.name": "elastic",
        "train.max_steps": STEPS, "train.checkpoint_every": 2, "train.log_every": 1, "train.warmup_steps": 1,
        "train.min_lr_ratio": 1.0, "data.num_workers": 0, "run.output_dir": cfg.run.output_dir,
        "scaling.min_workers": 1, "scaling.max_workers": 2, "scaling.resize_check_s": 1.0,
        "run.max_failures": 4}.items()]
    env = dict(os.environ, RAY_ADDRESS=cluster.address)
    cmd = [sys.executable, "-m", "tests.integration.callbacks", "--record", str(debug), "--slow", "0.4",
           "--config", str(TINY)]
    for s in sets:
        cmd += ["--set", s]
    driver = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log: list[str] = []
    reader = threading.Thread(target=lambda: log.extend(driver.stdout), daemon=True)
    reader.start()
    try:
        wait_for(lambda: max_step(debug, 2) >= 3, 180, "3 steps at world size 2")
        cluster.remove_node(nodes[1])  # 2 -> 1
        wait_for(lambda: max_step(debug, 1) >= max_step(debug, 2) + 2, 180, "2 steps at world size 1")
        nodes[1] = cluster.add_node(num_cpus=1)  # 1 -> 2
        assert driver.wait(300) == 0, "".join(log[-60:])
    finally:
        if driver.poll() is None:
            driver.kill()
        cluster.shutdown()
    (tmp_path / "driver.log").write_text("".join(log))
    final = assert_exactly_once(debug, STEPS)
    worlds = [final[s][0]["world_size"] for s in sorted(final)]
    # 2 first, then 1 after the node left, then 2 again after it came back
    compact = [w for i, w in enumerate(worlds) if i == 0 or w != worlds[i - 1]]
    assert compact == [2, 1, 2], worlds
    text = "".join(log)
    assert "via universal checkpoint" in text, text[-3000:]


def test_corrupt_data_ends_the_run_after_one_attempt(tmp_path):
    """The same shard fails the same way on every attempt: no restart, the loader's message."""
    import ray

    from pipelines.train import run_training
    from tests.integration.callbacks import RecordStarts
    from tests.integration.test_train_ray import make_config
    from trip import storage
    from trip.train.failures import FatalTrainingError

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "trip-torch-extensions"))
    cfg = make_config(str(tmp_path), "corrupt", 4, **{"run.max_failures": 2, "data.max_corrupt_fraction": 0.05})
    shard = storage.join(cfg.data.dataset, "shard-000001.tar")
    raw = storage.read_bytes(shard)
    storage.write_bytes_atomic(shard, raw[: len(raw) // 2])  # truncated: about half its samples lost
    try:  # run_training starts its own local Ray
        with pytest.raises(FatalTrainingError) as info:
            run_training(cfg, [RecordStarts(tmp_path / "debug")])
    finally:
        ray.shutdown()
    message = str(info.value)
    assert message.startswith("CorruptDataError on rank "), message
    assert "exceed data.max_corrupt_fraction=0.05" in message and "shard-000001.tar" in message, message
    starts = [json.loads(line) for line in (tmp_path / "debug" / "starts.jsonl").read_text().splitlines()]
    assert len({s["attempt"] for s in starts}) == 1, starts  # run.max_failures=2 left unused
