"""The shipped Grafana dashboard and Prometheus alert rules: they parse, and they cover the run.

`promtool` (Debian package `prometheus`, installed by `make system-deps`) is the real
parser; every dashboard expression is wrapped into a generated rules file so promtool
parses it exactly as Prometheus would.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from trip import monitoring_exprs as mx
from trip.train.validation import VALIDATION_METRICS

# The metric contract of the exporters (issue 6); an expression naming anything else is a typo.
TRIP_METRICS = {
    "trip_train_step_seconds_bucket", "trip_train_step_seconds_sum", "trip_train_step_seconds_count",
    "trip_train_samples_total", "trip_train_steps_total", "trip_train_loss", "trip_train_grad_norm",
    "trip_train_lr", "trip_data_wait_seconds_total", "trip_data_corrupt_samples_total",
    "trip_checkpoint_save_seconds_bucket", "trip_checkpoint_save_seconds_sum",
    "trip_checkpoint_save_seconds_count", "trip_train_world_size", "trip_train_restarts_total",
    "trip_train_step", "trip_train_last_step_timestamp_seconds", "trip_gpu_memory_allocated_bytes",
    "trip_gpu_memory_reserved_bytes", "trip_preprocess_videos_total", "trip_preprocess_bytes_total",
    "trip_preprocess_encode_seconds_bucket", "trip_preprocess_shards_total",
    "trip_preprocess_fetch_retries_total", "trip_preprocess_fetch_failures_total",
    "trip_preprocess_fetch_bytes_total", "trip_data_bucket_samples_total", "trip_data_bucket_slots_total",
}
# the validation actor's (trip.train.validation)
TRIP_METRICS |= {f"trip_val_{name}" for name in VALIDATION_METRICS}
EXTERNAL_METRICS = {
    "ray_node_cpu_utilization", "ray_node_mem_used", "ray_node_gpus_utilization",
    "DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED",
}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: install Debian's 'prometheus' package (make system-deps)")
    return path


def check_rules(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), "check", "rules", str(path)],
                          capture_output=True, text=True, timeout=60)


def test_alert_rules_file_passes_promtool_check_rules() -> None:
    result = check_rules(mx.RULES_PATH)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 6 rules found" in result.stdout


def test_every_dashboard_and_rule_expression_parses_in_promtool(tmp_path: Path) -> None:
    exprs = mx.all_expressions()
    rules = tmp_path / "exprs.rules.yaml"
    rules.write_text(yaml.safe_dump(mx.as_rules_file(exprs), sort_keys=False))
    result = check_rules(rules)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout


def test_expression_check_fails_on_a_broken_expression(tmp_path: Path) -> None:
    broken = [mx.Expression("test", "sum by (run) (rate(trip_train_samples_total[1m])", "trip")]
    rules = tmp_path / "broken.rules.yaml"
    rules.write_text(yaml.safe_dump(mx.as_rules_file(broken)))
    result = check_rules(rules)
    assert result.returncode != 0
    assert "trip:expr_check:0" in result.stdout + result.stderr


def test_expressions_have_no_unsubstituted_dashboard_variables() -> None:
    for e in mx.all_expressions():
        assert "$" not in e.expr.replace("$labels", "").replace("$value", ""), e.where


def test_substitute_names_an_unknown_variable() -> None:
    with pytest.raises(KeyError, match=r"\$cluster"):
        mx.substitute('up{cluster="$cluster"}')
    assert mx.substitute('x{run=~"${run}"}[$__rate_interval]', {"run": "r1"}) == 'x{run=~"r1"}[1m]'


def test_every_expression_names_only_exported_metrics() -> None:
    for e in mx.all_expressions():
        names = mx.metric_names(e.expr)
        assert names, f"{e.where}: no metric in {e.expr}"
        unknown = names - TRIP_METRICS - EXTERNAL_METRICS
        assert not unknown, f"{e.where} names metrics nobody exports: {sorted(unknown)}"


def test_expressions_are_tagged_with_their_exporter() -> None:
    sources = {e.source for e in mx.all_expressions()}
    assert sources == {"trip", "ray", "dcgm"}
    for e in mx.all_expressions():
        if e.source == "trip":
            assert "ray_" not in e.expr and "DCGM_" not in e.expr, e.where


def test_dashboard_shows_every_required_view() -> None:
    exprs = " ".join(e.expr for e in mx.dashboard_expressions())
    required = {
        "throughput": "rate(trip_train_samples_total",
        "step time p50": "histogram_quantile(0.5, sum by (le, run) (rate(trip_train_step_seconds_bucket",
        "step time p95": "histogram_quantile(0.95, sum by (le, run) (rate(trip_train_step_seconds_bucket",
        "loss": "trip_train_loss",
        "grad norm": "trip_train_grad_norm",
        "lr": "trip_train_lr",
        "data wait share": "rate(trip_data_wait_seconds_total",
        "checkpoint time": "trip_checkpoint_save_seconds",
        "world size": "trip_train_world_size",
        "restarts": "trip_train_restarts_total",
        "per-rank breakdown": "sum by (rank)",
        "GPU utilisation": "DCGM_FI_DEV_GPU_UTIL",
        "GPU memory": "DCGM_FI_DEV_FB_USED",
        "Ray node metrics": "ray_node_cpu_utilization",
        "preprocessing progress": "trip_preprocess_videos_total",
        "preprocessing errors": 'trip_preprocess_videos_total{status="error"}',
        "validation loss": "trip_val_loss",
        "validation quality": "trip_val_psnr",
    }
    missing = [view for view, needle in required.items() if needle not in exprs]
    assert not missing, f"dashboard lacks: {missing}"


def test_dashboard_has_a_run_variable_used_by_training_panels() -> None:
    dashboard = json.loads(mx.DASHBOARD_PATH.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert "run" in variables and "trip_train" in variables["run"]["definition"]
    raw = [t["expr"] for p in mx._panels(dashboard["panels"]) for t in p.get("targets", [])]
    training = [x for x in raw if "trip_train" in x]
    assert training and all('run=~"$run"' in x for x in training)


def test_dashboard_panels_have_unique_ids_and_a_prometheus_datasource() -> None:
    dashboard = json.loads(mx.DASHBOARD_PATH.read_text())
    panels = mx._panels(dashboard["panels"])
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    assert dashboard["uid"] == "trip-training"
    for p in panels:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}", p["title"]
            assert p["targets"], p["title"]


def test_alert_rules_cover_the_failure_modes_with_severity_and_summary() -> None:
    doc = yaml.safe_load(mx.RULES_PATH.read_text())
    alerts = {r["alert"]: r for g in doc["groups"] for r in g["rules"]}
    assert set(alerts) == {
        "TripTrainingNoProgress", "TripTrainingLossNotFinite", "TripCorruptSampleRateHigh",
        "TripTrainingRestartsRepeated", "TripPreprocessErrorRateHigh", "TripValidationLossRising",
    }
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["annotations"]["summary"], name
    assert "trip_train_last_step_timestamp_seconds" in alerts["TripTrainingNoProgress"]["expr"]
    assert "trip_train_loss != trip_train_loss" in alerts["TripTrainingLossNotFinite"]["expr"]


def test_metric_names_lists_what_an_expression_reads() -> None:
    expr = 'sum(rate(trip_train_samples_total{run=~"a"}[1m])) / on() max(ray_node_mem_used) + DCGM_FI_DEV_FB_USED'
    assert mx.metric_names(expr) == {"trip_train_samples_total", "ray_node_mem_used", "DCGM_FI_DEV_FB_USED"}
    assert mx.GPU_ONLY_METRICS <= TRIP_METRICS


def test_dashboard_panels_do_not_overlap_on_the_grid() -> None:
    dashboard = json.loads(mx.DASHBOARD_PATH.read_text())
    cells: dict[tuple[int, int], str] = {}
    for panel in mx._panels(dashboard["panels"]):
        g = panel["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, panel["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]


def test_training_run_expressions_leave_out_preprocessing_gpu_ray_and_dcgm() -> None:
    exprs = mx.training_run_expressions()
    names = set().union(*(mx.metric_names(e.expr) for e in exprs))
    assert {"trip_train_samples_total", "trip_train_loss", "trip_data_wait_seconds_total"} <= names
    assert not {n for n in names if n.startswith(("trip_preprocess_", "ray_", "DCGM_"))}
    assert not names & mx.GPU_ONLY_METRICS
    assert any(e.where.startswith("rule ") for e in exprs)
