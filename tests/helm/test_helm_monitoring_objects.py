"""The chart's monitoring objects: PodMonitors that find the exporter ports, and the one
dashboard and rules file from monitoring/ shipped unchanged; each object switchable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.helm import manifest_checks as mc

pytestmark = pytest.mark.helm

MONITORING = mc.REPO / "monitoring"
MONITORING_KINDS = {"PodMonitor", "PrometheusRule"}


def monitoring_objects(docs: list[mc.Doc]) -> list[tuple[str, str]]:
    return sorted((d["kind"], d["metadata"]["name"]) for d in docs
                  if d["kind"] in MONITORING_KINDS or d["metadata"]["name"].endswith("-dashboard"))


def endpoints_and_pods(docs: list[mc.Doc]) -> list[tuple[mc.Doc, str, list[dict[str, int]]]]:
    """(podmonitor, endpoint port name, container ports of every pod template it selects)."""
    templates = [t for r in mc.by_kind(docs, "RayJob") for w, t in mc.pod_templates(r) if w != "submitter"]
    out = []
    for monitor in mc.by_kind(docs, "PodMonitor"):
        selected = [t for t in templates if mc.selector_matches(monitor["spec"]["selector"], t["metadata"]["labels"])]
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            out.append((monitor, endpoint["port"], [mc.container_ports(t) for t in selected]))
    return out


@pytest.mark.parametrize("values_file", mc.CI_VALUES, ids=[p.name for p in mc.CI_VALUES])
def test_every_podmonitor_endpoint_names_a_port_on_the_pods_it_selects(values_file: Path) -> None:
    docs = mc.ci_docs(values_file)
    for monitor, port, pods in endpoints_and_pods(docs):
        name = monitor["metadata"]["name"]
        assert pods, f"PodMonitor {name} selects no pod"
        assert any(port in ports for ports in pods), f"PodMonitor {name}: no selected pod has port {port}"


def test_trainer_podmonitor_scrapes_one_port_per_gpu_at_metrics_port_plus_local_rank() -> None:
    docs = mc.ci_docs(mc.CHART / "ci" / "elastic-gpu-values.yaml")
    monitor = mc.one(docs, "PodMonitor", "-trainer")
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["trip-metrics-0", "trip-metrics-1"]
    assert all(e["honorLabels"] and e["interval"] == "30s" for e in monitor["spec"]["podMetricsEndpoints"])
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    worker = mc.one(docs, "RayJob", "-train")["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]
    assert mc.container_ports(worker) == {"metrics": 8080, "trip-metrics-0": 9400, "trip-metrics-1": 9401}
    assert worker["metadata"]["labels"]["trip.io/metrics"] == "true"


def test_ray_podmonitor_scrapes_port_8080_on_head_and_workers() -> None:
    docs = mc.ci_docs(mc.CHART / "ci" / "minimal-values.yaml")
    (ray,) = [(m, p, pods) for m, p, pods in endpoints_and_pods(docs) if m["metadata"]["name"].endswith("-ray")]
    _, port, pods = ray
    assert port == "metrics" and len(pods) == 2  # head + worker group
    assert all(ports["metrics"] == 8080 for ports in pods)
    cluster = mc.one(docs, "RayJob", "-train")["spec"]["rayClusterSpec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["metrics-export-port"] == "8080"
    assert cluster["workerGroupSpecs"][0]["rayStartParams"]["metrics-export-port"] == "8080"


def test_preprocessing_podmonitor_scrapes_the_driver_on_the_head_pod() -> None:
    docs = mc.ci_docs(mc.CHART / "ci" / "preprocessing-only-values.yaml")
    monitor = mc.one(docs, "PodMonitor", "-preprocess")
    head = mc.one(docs, "RayJob", "-preprocess")["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
    assert mc.selector_matches(monitor["spec"]["selector"], head["metadata"]["labels"])
    assert mc.container_ports(head)["trip-metrics"] == 9500


def test_trainer_podmonitor_not_rendered_when_metrics_port_is_zero() -> None:
    docs = mc.render_docs({"runConfig": {"metrics": {"port": 0}}})
    assert not [d for d in mc.by_kind(docs, "PodMonitor") if d["metadata"]["name"].endswith("-trainer")]
    worker = mc.one(docs, "RayJob", "-train")["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]
    assert set(mc.container_ports(worker)) == {"metrics"}
    assert "trip.io/metrics" not in worker["metadata"]["labels"]


def test_podmonitors_prometheusrule_and_dashboard_not_rendered_when_monitoring_disabled() -> None:
    assert monitoring_objects(mc.ci_docs(mc.CHART / "ci" / "monitoring-off-values.yaml")) == []
    assert len(monitoring_objects(mc.render_docs())) == 4


@pytest.mark.parametrize(("switch", "gone"), [
    ("podMonitors", {("PodMonitor", "trip-trainer"), ("PodMonitor", "trip-ray")}),
    ("prometheusRule", {("PrometheusRule", "trip-alerts")}),
    ("dashboard", {("ConfigMap", "trip-dashboard")}),
])
def test_each_monitoring_object_switches_off_alone(switch: str, gone: set[tuple[str, str]]) -> None:
    everything = set(monitoring_objects(mc.render_docs()))
    left = set(monitoring_objects(mc.render_docs({"monitoring": {switch: {"enabled": False}}})))
    assert everything - left == gone


def test_dashboard_configmap_is_labelled_for_grafana_and_holds_the_monitoring_file_byte_for_byte() -> None:
    configmap = mc.one(mc.render_docs(), "ConfigMap", "-dashboard")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = configmap["data"]["trip-dashboard.json"]
    assert shipped == (MONITORING / "grafana" / "trip-dashboard.json").read_text()
    assert json.loads(shipped)["uid"] == "trip-training"
    other = mc.one(mc.render_docs({"monitoring": {"dashboard": {"namespace": "grafana"}}}), "ConfigMap", "-dashboard")
    assert other["metadata"]["namespace"] == "grafana"


def test_prometheusrule_holds_the_monitoring_rules_file_unchanged() -> None:
    rule = mc.one(mc.render_docs(), "PrometheusRule")
    source = yaml.safe_load((MONITORING / "prometheus" / "trip-alerts.rules.yaml").read_text())
    assert rule["spec"]["groups"] == source["groups"]
    # Alert templates stay for Prometheus to expand; Helm must not have touched them.
    assert "{{ $labels.run }}" in rule["spec"]["groups"][0]["rules"][0]["annotations"]["summary"]


def test_chart_files_are_symlinks_to_the_single_monitoring_sources() -> None:
    for name, target in [("trip-dashboard.json", MONITORING / "grafana" / "trip-dashboard.json"),
                         ("trip-alerts.rules.yaml", MONITORING / "prometheus" / "trip-alerts.rules.yaml")]:
        link = mc.CHART / "files" / name
        assert link.is_symlink(), f"{link} must link to {target}, not be a copy"
        assert link.resolve() == target.resolve()
