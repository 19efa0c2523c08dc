"""Ray Train + DeepSpeed ZeRO-3 on 2 CPU workers, data and checkpoints in the moto S3 server.

Ray runs cost ~20-40 s each on 2 cores, so one run serves several claims: loss decreases,
each rank holds half of every partitioned parameter, checkpoints land in S3 complete,
the Prometheus exporters are scraped by a real Prometheus. A second invocation with the
same run name resumes; its losses must match an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import free_port
from trip.config import load_config

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "pipelines" / "configs" / "tiny_cpu.yaml"


@pytest.fixture(scope="module")
def ray_local():
    import ray

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "trip-torch-extensions"))
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


VALIDATED = {"train.validate_every": 2, "train.validation_samples": 4, "train.validation_videos": 1,
             "sample.steps": 2}


def make_config(bucket: str, name: str, steps: int, port: int = 0, **extra: object):
    from data_tools.synth import write_synthetic_dataset

    data = f"{bucket}/data"
    from trip import storage

    if not storage.exists(storage.join(data, "index.json")):
        write_synthetic_dataset(data, [16, 16], latent_shape=(8, 192, 4, 4), text_shape=None)
        write_synthetic_dataset(f"{bucket}/validation", [4], latent_shape=(8, 192, 4, 4), text_shape=None, seed=7)
    extra = {"data.validation": f"{bucket}/validation", **extra}
    sets = {"data.dataset": data, "run.storage_path": f"{bucket}/runs", "run.name": name,
            "train.max_steps": steps, "train.checkpoint_every": 2, "train.log_every": 1,
            "train.warmup_steps": 1, "train.min_lr_ratio": 1.0, "metrics.port": port, "metrics.addr": "127.0.0.1",
            "data.num_workers": 0, "run.output_dir": f"{bucket}/out/{name}", **extra}
    return load_config(TINY, [f"{k}={v}" for k, v in sets.items()])


def check_monitoring_exprs(prom: Prometheus) -> None:
    """Every dashboard/alert expression a CPU training run can answer evaluates in Prometheus
    and reads only metrics the workers export."""
    from trip import monitoring_exprs

    exprs = monitoring_exprs.training_run_expressions()
    assert exprs, "no training expressions found in monitoring/"
    exposed = {r["metric"]["__name__"] for r in prom.query('{__name__=~"trip_.+"}[5m]')}
    for e in exprs:
        prom.query(e.expr)  # parses and evaluates (status success)
        missing = monitoring_exprs.metric_names(e.expr) - exposed
        assert not missing, f"{e.where} uses {sorted(missing)}, not exported by the workers"


class Prometheus:
    """Debian's prometheus on 127.0.0.1 scraping the given targets every second."""

    def __init__(self, targets: list[str], workdir: str) -> None:
        self.port = free_port()
        conf = Path(workdir) / "prometheus.yml"
        conf.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n  - job_name: trip\n    static_configs:\n"
            f"      - targets: {json.dumps(targets)}\n")
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={conf}", f"--web.listen-address=127.0.0.1:{self.port}",
             f"--storage.tsdb.path={workdir}/tsdb"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def query(self, expr: str) -> list[dict]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=5) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]["result"]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def test_train_two_workers_s3_prometheus_and_resume(ray_local, s3_bucket, tmp_path, monkeypatch):
    import s3fs

    from pipelines.train import run_training
    from trip.train.callbacks import RecordSteps

    if shutil.which("prometheus") is None:
        subprocess.run(["apt-get", "install", "-y", "prometheus"], check=True, capture_output=True)
    debug = tmp_path / "debug"
    port = free_port()
    # the workers on port, port + 1; the validation actor on port - 1
    prom = Prometheus([f"127.0.0.1:{port + i}" for i in (-1, 0, 1)], tempfile.mkdtemp(dir=tmp_path))
    validated: list[int] = []
    try:
        # run A, part 1: 4 of 6 steps (the LR schedule is constant after warmup, so stopping
        # early is the same trajectory as an interrupted 6-step run), validated every 2 steps
        cfg = make_config(s3_bucket, "resumed", 4, port=port, **VALIDATED)

        def on_validation(step: int, figures: dict) -> None:
            # the validation actor stops with the run: hold the driver until Prometheus has
            # scraped this result (1 s scrape interval), so the query below sees it
            validated.append(step)
            for _ in range(40):
                if prom.query(f'trip_val_step{{run="resumed"}} == {step}'):
                    return
                time.sleep(0.25)

        first = run_training(cfg, [RecordSteps(str(debug))], on_validation=on_validation)
        assert first.steps == 4 and validated == [2, 4]
        # both ranks were scraped while training (the exporters stop with the run, so query
        # over a window: range selectors skip the staleness markers)
        for _ in range(20):
            rows = prom.query('last_over_time(trip_train_samples_total{run="resumed"}[5m])')
            if len(rows) == 2:
                break
            time.sleep(0.5)
        assert sorted(r["metric"]["rank"] for r in rows) == ["0", "1"]
        grew = prom.query('max_over_time(trip_train_samples_total{run="resumed"}[5m])'
                          ' - min_over_time(trip_train_samples_total{run="resumed"}[5m])')
        assert len(grew) == 2 and all(float(r["value"][1]) > 0 for r in grew), grew
        loss = prom.query('last_over_time(trip_train_loss{run="resumed"}[5m])')
        assert len(loss) == 2 and all(math.isfinite(float(r["value"][1])) for r in loss)
        series = prom.query('{__name__=~"trip_.+", run="resumed"}[5m]')
        names = {r["metric"]["__name__"] for r in series}
        assert {"trip_train_steps_total", "trip_train_step_seconds_bucket", "trip_train_lr",
                "trip_checkpoint_save_seconds_count", "trip_train_world_size"} <= names, names
        labels = {k for r in series for k in r["metric"]}
        assert labels <= {"__name__", "run", "rank", "node", "job", "instance", "group", "le", "bucket"}, labels
        buckets = prom.query('last_over_time(trip_data_bucket_samples_total{run="resumed"}[5m])')
        assert {r["metric"]["bucket"] for r in buckets} == {"all"}  # a dataset without buckets is one
        values = {v for r in series for v in r["metric"].values()}
        assert not any("testing" in v or "s3://" in v for v in values), values  # no credentials or URLs
        val = prom.query('last_over_time(trip_val_loss{run="resumed"}[5m])')
        assert [r["metric"]["rank"] for r in val] == ["validation"] and math.isfinite(float(val[0]["value"][1]))
        check_monitoring_exprs(prom)
    finally:
        prom.stop()

    # each rank held half of every partitioned parameter
    for r in (0, 1):
        info = json.loads((debug / f"worker-rank{r}.json").read_text())
        assert info["world_size"] == 2
        assert abs(info["partition_fraction"] - 0.5) < 0.01, info

    # checkpoints are in S3, complete, and only the newest keep_checkpoints = 2 are kept
    from trip.train.checkpoint import RunDir

    fs = s3fs.S3FileSystem(endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    fs.invalidate_cache()
    bucket = s3_bucket.removeprefix("s3://")
    run = RunDir(f"{s3_bucket}/runs", "resumed")
    assert run.steps() == [2, 4]
    found = run.latest()
    # the callbacks saw every commit, on rank 0 only, with the checkpoint's url
    commits = [json.loads(line) for line in (debug / "checkpoints.jsonl").read_text().splitlines()]
    assert [(c["step"], c["url"]) for c in commits] == [(2, run.checkpoint_url(2)), (4, found.url)]
    assert first.checkpoint == found.url and found.url.startswith("s3://")
    assert found.step == 4 and found.record["world_size"] == 2
    assert "history" not in found.record  # the loss history lives in history/*.jsonl
    assert fs.exists(f"{bucket}/out/resumed/training.png")
    assert fs.exists(f"{bucket}/runs/resumed/training.png") and fs.exists(f"{bucket}/runs/resumed/summary.json")

    # run A, part 2: same name, 6 steps -> resumes at 4; validates step 6 only (2 and 4 are done)
    resumed = run_training(make_config(s3_bucket, "resumed", 6, **VALIDATED),
                           on_validation=lambda step, f: validated.append(step))
    assert resumed.steps == 6 and validated == [2, 4, 6]
    for step in (2, 4, 6):
        result = json.loads(fs.cat(f"{bucket}/runs/resumed/validation/step-{step:09d}/result.json"))
        assert math.isfinite(result["loss"]) and result["samples"] == 4
        assert fs.exists(f"{bucket}/runs/resumed/validation/step-{step:09d}/contact_sheet.png")
    # run B: uninterrupted 6 steps
    straight = run_training(make_config(s3_bucket, "straight", 6))
    assert straight.steps == 6 and straight.summary.endswith("out/straight/summary.json")
    hist = lambda name: {h["step"]: h["loss"] for h in RunDir(f"{s3_bucket}/runs", name).history()}  # noqa: E731
    a, b = hist("resumed"), hist("straight")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-4, abs=1e-5), (step, a, b)
    # six steps of a from-scratch model say nothing about learning (one sample at t=14 makes a
    # step's loss 10x the others': the image noise prior divides by sqrt(1 - abar_t)); the demo
    # test trains long enough to check that. Here: every step's loss is a finite number.
    assert all(math.isfinite(v) for v in b.values()), b
    summary = json.loads(fs.cat(f"{bucket}/out/straight/summary.json"))
    assert summary["steps"] == 6 and math.isfinite(summary["final_loss"])

    # `trip export` of the S3 checkpoint gives a model directory that `trip sample` and diffusers load
    from trip.cli import main as trip_main
    from trip.model import TRIPModel

    out = tmp_path / "model"
    assert trip_main(["export", "--checkpoint", resumed.checkpoint, "--out", str(out)]) == 0
    model = TRIPModel.from_pretrained(str(out))
    assert sum(p.numel() for p in model.parameters()) > 0
    assert json.loads((out / "trip.json").read_text())["config"]["codec"]["kind"] == "lossless"
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()  # the diffusers layout by default
