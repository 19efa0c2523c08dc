"""The alert rules fire on the failures they name and stay silent on a healthy run.

Uses `promtool test rules` (Prometheus' own rule evaluator, Debian package `prometheus`)
on synthetic series: each scenario pairs a broken run with a healthy one and says which
alerts must be firing at which time.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from trip import monitoring_exprs as mx

LABELS = 'node="n1"'


def series(name: str, values: str, **labels: str) -> dict[str, str]:
    text = ",".join([f'{k}="{v}"' for k, v in labels.items()] + [LABELS])
    return {"series": f"{name}{{{text}}}", "values": values}


def alerts(name: str, at: str, *label_sets: dict[str, str]) -> dict[str, Any]:
    return {"eval_time": at, "alertname": name, "exp_alerts": [{"exp_labels": dict(ls)} for ls in label_sets]}


SCENARIOS: dict[str, dict[str, Any]] = {
    "no progress for 15 minutes": {
        "input_series": [
            series("trip_train_last_step_timestamp_seconds", "60x40", run="stuck", rank="0"),
            series("trip_train_last_step_timestamp_seconds", "0+60x40", run="healthy", rank="0"),
        ],
        "alert_rule_test": [
            alerts("TripTrainingNoProgress", "10m"),
            alerts("TripTrainingNoProgress", "20m", {"severity": "critical", "run": "stuck"}),
        ],
    },
    "loss NaN or infinite": {
        "input_series": [
            series("trip_train_loss", "1 0.9 NaN NaN", run="diverged", rank="0"),
            series("trip_train_loss", "1 0.9 Inf Inf", run="diverged", rank="1"),
            series("trip_train_loss", "1 0.9 0.8 0.7", run="healthy", rank="0"),
        ],
        "alert_rule_test": [
            alerts("TripTrainingLossNotFinite", "1m"),
            alerts("TripTrainingLossNotFinite", "3m",
                   {"severity": "critical", "run": "diverged", "rank": "0"},
                   {"severity": "critical", "run": "diverged", "rank": "1"}),
        ],
    },
    "corrupt-sample rate above 1%": {
        "input_series": [
            series("trip_train_samples_total", "0+100x40", run="bad", rank="0"),
            series("trip_data_corrupt_samples_total", "0+5x40", run="bad", rank="0"),
            series("trip_train_samples_total", "0+100x40", run="healthy", rank="0"),
            series("trip_data_corrupt_samples_total", "0+0.5x40", run="healthy", rank="0"),
        ],
        "alert_rule_test": [
            alerts("TripCorruptSampleRateHigh", "5m"),
            alerts("TripCorruptSampleRateHigh", "30m", {"severity": "warning", "run": "bad"}),
        ],
    },
    "three restarts within an hour": {
        "input_series": [
            series("trip_train_restarts_total", "0 0 1 1 2 2 3 3 3 3", run="flapping", rank="0"),
            series("trip_train_restarts_total", "1x10", run="healthy", rank="0"),
        ],
        "alert_rule_test": [
            alerts("TripTrainingRestartsRepeated", "4m"),
            alerts("TripTrainingRestartsRepeated", "8m", {"severity": "warning", "run": "flapping"}),
        ],
    },
    "validation loss rose three validations in a row": {
        "input_series": [
            series("trip_val_loss_rises", "0 1 1 2 2 3 3", run="overfitting", rank="validation"),
            series("trip_val_loss_rises", "0 1 0 1 2 0 1", run="healthy", rank="validation"),
        ],
        "alert_rule_test": [
            alerts("TripValidationLossRising", "4m"),
            alerts("TripValidationLossRising", "6m", {"severity": "warning", "run": "overfitting"}),
        ],
    },
    "preprocessing error rate above 5%": {
        "input_series": [
            series("trip_preprocess_videos_total", "0+90x60", status="ok"),
            series("trip_preprocess_videos_total", "0+2x60", status="skipped"),
            series("trip_preprocess_videos_total", "0+10x60", status="error"),
        ],
        "alert_rule_test": [
            alerts("TripPreprocessErrorRateHigh", "10m"),
            alerts("TripPreprocessErrorRateHigh", "40m", {"severity": "warning"}),
        ],
    },
    "preprocessing with a few errors is healthy": {
        "input_series": [
            series("trip_preprocess_videos_total", "0+99x60", status="ok"),
            series("trip_preprocess_videos_total", "0+1x60", status="error"),
        ],
        "alert_rule_test": [alerts("TripPreprocessErrorRateHigh", "50m")],
    },
}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: install Debian's 'prometheus' package (make system-deps)")
    return path


def rules_without_annotations(tmp_path: Path) -> Path:
    """The shipped rules with annotations dropped: these tests are about when alerts fire;
    the annotation texts (which embed $value) are checked once, below."""
    doc = yaml.safe_load(mx.RULES_PATH.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def run_promtool_test(tmp_path: Path, rules: Path, tests: list[dict[str, Any]]) -> subprocess.CompletedProcess[str]:
    spec = {"rule_files": [str(rules)], "evaluation_interval": "1m", "tests": tests}
    path = tmp_path / "alerts.test.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return subprocess.run([promtool(), "test", "rules", str(path)], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_alert_fires_on_the_failure_and_not_on_a_healthy_run(scenario: str, tmp_path: Path) -> None:
    test = {"name": scenario, "interval": "1m", **SCENARIOS[scenario]}
    result = run_promtool_test(tmp_path, rules_without_annotations(tmp_path), [test])
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_alert_tests_can_fail(tmp_path: Path) -> None:
    """A healthy run wrongly expected to alert must make promtool fail (the check is live)."""
    test = {"interval": "1m",
            "input_series": [series("trip_train_loss", "1 0.9 0.8", run="healthy", rank="0")],
            "alert_rule_test": [alerts("TripTrainingLossNotFinite", "2m",
                                       {"severity": "critical", "run": "healthy", "rank": "0"})]}
    result = run_promtool_test(tmp_path, rules_without_annotations(tmp_path), [test])
    assert result.returncode != 0
    assert "TripTrainingLossNotFinite" in result.stdout + result.stderr


def test_alert_annotations_render_with_the_run_and_rank(tmp_path: Path) -> None:
    test = {"interval": "1m",
            "input_series": [series("trip_train_loss", "NaN NaN", run="r7", rank="3")],
            "alert_rule_test": [{"eval_time": "1m", "alertname": "TripTrainingLossNotFinite", "exp_alerts": [{
                "exp_labels": {"severity": "critical", "run": "r7", "rank": "3"},
                "exp_annotations": {
                    "summary": "TRIP run r7 reports a NaN or infinite loss (rank 3)",
                    "description": "The loss of run r7 is not finite. Training diverged: lower the "
                                   "learning rate or resume from an earlier checkpoint.",
                }}]}]}
    result = run_promtool_test(tmp_path, mx.RULES_PATH, [test])
    assert result.returncode == 0, result.stdout + result.stderr
