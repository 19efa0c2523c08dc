"""The plain manifests: `kubectl kustomize k8s/overlays/<each>` builds, its objects validate
like the chart's, and the generated files are exactly what the chart renders today."""

from __future__ import annotations

import functools
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helm import manifest_checks as mc

pytestmark = pytest.mark.helm

K8S = mc.REPO / "k8s"
OVERLAYS = sorted(p for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").exists())
IDS = [p.name for p in OVERLAYS]


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.fail("kubectl not found: it provides `kubectl kustomize` (no cluster needed)")
    return path


@functools.cache
def _build(overlay: str) -> tuple[mc.Doc, ...]:
    result = subprocess.run([kubectl(), "kustomize", overlay], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return tuple(d for d in yaml.safe_load_all(result.stdout) if d)


def build(overlay: Path) -> list[mc.Doc]:
    import copy

    return copy.deepcopy(list(_build(str(overlay))))


def test_overlays_exist_for_fixed_elastic_and_preprocessing() -> None:
    assert set(IDS) == {"gpu-fixed", "gpu-elastic", "preprocess"}


def test_generated_manifests_match_a_fresh_render_of_the_chart() -> None:
    result = subprocess.run([sys.executable, str(K8S / "generate.py"), "--check"],
                            capture_output=True, text=True, cwd=mc.REPO, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("overlay", OVERLAYS, ids=IDS)
def test_overlay_builds_into_one_namespace(overlay: Path) -> None:
    docs = build(overlay)
    assert {d["metadata"].get("namespace") for d in docs} == {"trip"}
    assert mc.by_kind(docs, "RayJob") and mc.by_kind(docs, "ServiceAccount")


@pytest.mark.parametrize("version", mc.K8S_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS, ids=IDS)
def test_overlay_core_objects_and_pod_templates_validate_strictly(overlay: Path, version: str) -> None:
    docs = build(overlay)
    for doc in docs:
        if doc["kind"] not in mc.CUSTOM_KINDS:
            mc.validate_core(doc, version)
    for rayjob in mc.by_kind(docs, "RayJob"):
        mc.validate_pod_templates(rayjob, version)


@pytest.mark.parametrize("overlay", OVERLAYS, ids=IDS)
def test_overlay_custom_resources_have_the_fields_their_operators_require(overlay: Path) -> None:
    problems = [p for d in build(overlay) if d["kind"] in mc.CUSTOM_KINDS for p in mc.check_custom(d)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("overlay", OVERLAYS, ids=IDS)
def test_overlay_podmonitors_find_their_ports(overlay: Path) -> None:
    docs = build(overlay)
    templates = [t for r in mc.by_kind(docs, "RayJob") for w, t in mc.pod_templates(r) if w != "submitter"]
    for monitor in mc.by_kind(docs, "PodMonitor"):
        selected = [t for t in templates if mc.selector_matches(monitor["spec"]["selector"], t["metadata"]["labels"])]
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            assert any(endpoint["port"] in mc.container_ports(t) for t in selected), monitor["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS, ids=IDS)
def test_overlay_run_config_passes_trip_config_validate_and_matches_the_worker_group(overlay: Path, tmp_path: Path) -> None:
    from trip.config import load_config

    docs = build(overlay)
    configmap = mc.one(docs, "ConfigMap", "-config")
    path = tmp_path / "config.yaml"
    path.write_text(configmap["data"]["config.yaml"])
    result = subprocess.run([sys.executable, "-m", "trip.cli", "config", "validate", "--config", str(path)],
                            capture_output=True, text=True, cwd=mc.REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    cfg = load_config(path)
    for rayjob in mc.by_kind(docs, "RayJob"):
        templates = dict(mc.pod_templates(rayjob))
        volumes = [v for t in templates.values() for v in t["spec"].get("volumes", []) if "configMap" in v]
        assert {v["configMap"]["name"] for v in volumes} == {configmap["metadata"]["name"]}
        if rayjob["metadata"]["name"] == "trip-train":
            group = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
            ports = [p for p in mc.container_ports(group["template"]) if p.startswith("trip-metrics-")]
            per_pod = len(ports)
            assert group["minReplicas"] * per_pod == min(cfg.scaling.world_sizes)
            assert group["maxReplicas"] * per_pod == max(cfg.scaling.world_sizes)


def test_elastic_overlay_runs_the_autoscaler_with_its_rbac() -> None:
    docs = build(K8S / "overlays" / "gpu-elastic")
    cluster = mc.one(docs, "RayJob", "-train")["spec"]["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["template"]["spec"]["automountServiceAccountToken"] is True
    binding = mc.one(docs, "RoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "trip", "namespace": "trip"}]
    assert not mc.by_kind(build(K8S / "overlays" / "gpu-fixed"), "Role")


def test_kustomize_ships_the_same_dashboard_and_rules_as_monitoring() -> None:
    docs = build(K8S / "overlays" / "gpu-fixed")
    dashboard = mc.one(docs, "ConfigMap", "-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["data"]["trip-dashboard.json"] == (mc.REPO / "monitoring/grafana/trip-dashboard.json").read_text()
    rules = yaml.safe_load((mc.REPO / "monitoring/prometheus/trip-alerts.rules.yaml").read_text())
    assert mc.one(docs, "PrometheusRule")["spec"]["groups"] == rules["groups"]


def test_kustomize_objects_equal_the_charts_apart_from_helm_labels_and_namespace() -> None:
    """Every object of the gpu-fixed overlay is the chart's, rendered with k8s/chart-values.yaml."""
    spec = importlib.util.spec_from_file_location("k8s_generate", K8S / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    values = yaml.safe_load((K8S / "chart-values.yaml").read_text())
    chart = {(d["kind"], d["metadata"]["name"]): d for d in mc.render_docs(values, name="trip", namespace="trip")}
    built = build(K8S / "overlays" / "gpu-fixed")
    assert {(d["kind"], d["metadata"]["name"]) for d in built} <= set(chart)
    for doc in built:
        key = (doc["kind"], doc["metadata"]["name"])
        expected = generate.strip_helm(chart[key])
        if key == ("ConfigMap", "trip-config"):
            assert yaml.safe_load(doc["data"]["config.yaml"]) == yaml.safe_load(expected["data"]["config.yaml"])
            continue
        for d in (doc, expected):
            d["metadata"].pop("namespace", None)
        assert doc == expected, key


def test_elastic_overlay_config_differs_from_the_base_only_in_scaling_and_failures() -> None:
    base = yaml.safe_load((K8S / "base" / "config.yaml").read_text())
    elastic = yaml.safe_load((K8S / "overlays" / "gpu-elastic" / "config.yaml").read_text())
    assert elastic["scaling"]["min_workers"] < elastic["scaling"]["max_workers"]
    for cfg in (base, elastic):
        cfg.pop("scaling")
        cfg["run"].pop("max_failures")
    assert elastic == base
