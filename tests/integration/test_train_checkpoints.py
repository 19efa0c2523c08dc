"""Checkpoints at cluster scale, with real Ray processes and the S3 server behind a proxy.

- A resume at the same world size: each of 3 ranks (3 Ray nodes) downloads only its own
  ZeRO files and EMA slice, measured in bytes on the wire per worker process.
- SIGKILL of a worker while its checkpoint upload is held in flight: that checkpoint never
  becomes complete, the run resumes from the previous one and finishes exactly-once.
- SIGTERM to one worker: the group checkpoints at the next step within the grace, exits,
  and the resumed run starts right after that step (no step trained twice).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.integration.callbacks import recording
from tests.integration.test_train_faults import assert_exactly_once, max_step, rows, wait_for
from tests.s3proxy import S3Proxy

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "pipelines" / "configs" / "tiny_cpu.yaml"


@pytest.fixture()
def proxy(s3_server, monkeypatch):
    """Workers reach S3 through an S3Proxy (AWS_ENDPOINT_URL is forwarded to them)."""
    p = S3Proxy(int(s3_server.rsplit(":", 1)[1]))
    monkeypatch.setenv("AWS_ENDPOINT_URL", p.endpoint)
    yield p
    p.close()


def _config(storage: str, data: str, name: str, steps: int, debug_extra: dict | None = None, **extra):
    from trip.config import load_config

    sets = {"data.dataset": data, "run.storage_path": storage, "run.name": name, "train.max_steps": steps,
            "train.checkpoint_every": 2, "train.log_every": 1, "train.warmup_steps": 1, "train.min_lr_ratio": 1.0,
            "metrics.port": 0, "data.num_workers": 0, **extra}
    return load_config(TINY, [f"{k}={v}" for k, v in sets.items()])


def _local_dataset(tmp_path: Path) -> str:
    """Data on local disk, so that the S3 traffic is checkpoint traffic only."""
    from data_tools.synth import write_synthetic_dataset

    data = str(tmp_path / "data")
    write_synthetic_dataset(data, [16, 16], latent_shape=(8, 192, 4, 4), text_shape=None)
    return data


def _pid(debug: Path, rank: int) -> int:
    return json.loads((debug / f"worker-rank{rank}.json").read_text())["pid"]


def test_resume_at_the_same_size_downloads_only_each_ranks_own_files(s3_bucket, proxy, tmp_path, monkeypatch):
    import ray
    from ray.cluster_utils import Cluster

    from pipelines.train import run_training
    from trip.train import checkpoint as ckpt

    debug = tmp_path / "debug"
    record = recording(debug)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "trip-torch-extensions"))
    data = _local_dataset(tmp_path)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(3):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        ray.init(address=cluster.address)
        storage = f"{s3_bucket}/runs"
        first = run_training(_config(storage, data, "three", 4, **{"scaling.num_workers": 3}), record)
        assert first.steps == 4
        proxy.reset()
        second = run_training(_config(storage, data, "three", 6, **{"scaling.num_workers": 3}), record)
        assert second.steps == 6
    finally:
        ray.shutdown()
        cluster.shutdown()
    run = ckpt.RunDir(storage, "three")
    rec = run.record(4)
    assert rec is not None and rec["world_size"] == 3
    record_bytes = len(json.dumps(rec).encode())
    for r in range(3):
        own = sum(rec["files"][f] for f in ckpt.own_files(rec, r))
        got = proxy.down_bytes[_pid(debug, r)]
        assert own > 0 and got > 0
        # own ZeRO files + own EMA slice (+ the record and the listings for rank 0), nothing else
        assert got <= 1.1 * (own + record_bytes), (r, got, own, record_bytes)
    total = sum(v for k, v in rec["files"].items() if k.startswith(("ds/", "ema/")))
    assert max(proxy.down_bytes[_pid(debug, r)] for r in range(3)) < 0.5 * total  # no rank read the whole


def test_sigkill_while_an_upload_is_in_flight_resumes_from_the_previous_checkpoint(s3_server, s3_bucket, proxy,
                                                                                    tmp_path, monkeypatch):
    import ray

    from pipelines.train import run_training
    from trip.train import checkpoint as ckpt

    debug = tmp_path / "debug"
    record = recording(debug, slow=0.3)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "trip-torch-extensions"))
    import s3fs

    data = _local_dataset(tmp_path)
    storage = f"{s3_bucket}/runs"
    direct = s3fs.S3FileSystem(endpoint_url=s3_server)  # the test's own view, not held by the proxy
    seen: dict[str, object] = {}

    def committed(step: int) -> bool:
        direct.invalidate_cache()
        return direct.exists(f"{s3_bucket.removeprefix('s3://')}/runs/held/checkpoints/"
                             f"{ckpt.step_name(step)}/{ckpt.RECORD}")

    def killer() -> None:
        wait_for(lambda: committed(2), 240, "the step-2 checkpoint to be committed")
        proxy.hold_uploads()  # from here on no byte reaches storage: the step-4 upload stalls
        wait_for(lambda: max_step(debug) >= 5, 120, "training past the step-4 save")
        seen["step4_complete_at_kill"] = committed(4)
        seen["trained_to"] = max_step(debug)
        os.kill(_pid(debug, 1), signal.SIGKILL)
        time.sleep(2)
        proxy.release()

    ray.init(num_cpus=2, include_dashboard=False)
    try:
        t = threading.Thread(target=killer, daemon=True)
        t.start()
        res = run_training(_config(storage, data, "held", 8, **{"run.max_failures": 2}), record)
        t.join(5)
    finally:
        proxy.release()
        ray.shutdown()
    assert seen.get("step4_complete_at_kill") is False, seen
    assert seen["trained_to"] >= 5  # training went on while the upload was held
    assert res.steps == 8
    attempts = sorted({r["attempt"] for r in rows(debug)})
    assert len(attempts) == 2
    resumed_at = min(r["step"] for r in rows(debug) if r["attempt"] == attempts[1]) - 1
    assert resumed_at == 2, resumed_at  # the torn step-4 checkpoint was not used
    assert_exactly_once(debug, 8)


def test_sigterm_checkpoints_within_the_grace_and_the_resumed_run_repeats_no_step(tmp_path, monkeypatch):
    import ray

    from pipelines.train import run_training
    from trip.train import checkpoint as ckpt

    debug = tmp_path / "debug"
    record = recording(debug, slow=0.3)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "trip-torch-extensions"))
    data = _local_dataset(tmp_path)
    storage = str(tmp_path / "runs")
    grace = 20.0
    sent: dict[str, float] = {}

    def terminate() -> None:
        wait_for(lambda: max_step(debug) >= 3, 240, "step 3")
        sent["at"] = time.time()
        os.kill(_pid(debug, 1), signal.SIGTERM)  # what Kubernetes sends on drain / spot reclaim

    ray.init(num_cpus=2, include_dashboard=False)
    try:
        t = threading.Thread(target=terminate, daemon=True)
        t.start()
        # no periodic checkpoint before the end: the only one mid-run is the preemption's
        res = run_training(_config(storage, data, "term", 12, **{"train.checkpoint_every": 100, "run.max_failures": 2,
                                                               "run.preemption_grace_s": grace}), record)
        t.join(5)
    finally:
        ray.shutdown()
    assert res.steps == 12
    attempts = sorted({r["attempt"] for r in rows(debug)})
    assert len(attempts) == 2, attempts
    stopped = max(r["step"] for r in rows(debug) if r["attempt"] == attempts[0])
    first_again = min(r["step"] for r in rows(debug) if r["attempt"] == attempts[1])
    assert first_again == stopped + 1, (stopped, first_again)  # resumed right after the preemption's step
    run = ckpt.RunDir(storage, "term")
    assert stopped in run.steps() and run.record(stopped) is not None
    committed = os.stat(Path(run.checkpoint_url(stopped)) / ckpt.RECORD).st_mtime
    assert committed - sent["at"] <= grace, committed - sent["at"]
    assert_exactly_once(debug, 12)
