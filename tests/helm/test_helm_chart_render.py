"""The Helm chart renders, lints and validates offline for every ci/*-values.yaml.

Rendering and linting go through Helm's own Go SDK (helm-python-sdk); core objects are
validated strictly for Kubernetes 1.29-1.32, custom resources by the operator checks in
manifest_checks.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import helm_python
import pytest

from tests.helm import manifest_checks as mc

pytestmark = pytest.mark.helm

CI_IDS = [p.name.removesuffix("-values.yaml") for p in mc.CI_VALUES]
EXPECTED_KINDS = {
    "minimal": {"ConfigMap", "ServiceAccount", "NetworkPolicy", "RayJob", "PodMonitor", "PrometheusRule"},
    "elastic-gpu": {"ConfigMap", "ServiceAccount", "NetworkPolicy", "RayJob", "PodMonitor",
                    "PrometheusRule", "Role", "RoleBinding"},
    "monitoring-off": {"ConfigMap", "ServiceAccount", "RayJob"},
    "preprocessing-only": {"ConfigMap", "ServiceAccount", "NetworkPolicy", "RayJob", "PodMonitor"},
}


def test_ci_values_cover_every_feature_combination() -> None:
    assert set(CI_IDS) == set(EXPECTED_KINDS)


@pytest.mark.parametrize("values_file", mc.CI_VALUES, ids=CI_IDS)
def test_each_ci_values_file_renders_the_expected_objects(values_file: Path) -> None:
    docs = mc.ci_docs(values_file)
    kinds = {d["kind"] for d in docs}
    assert kinds == EXPECTED_KINDS[values_file.name.removesuffix("-values.yaml")]
    names = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(names) == len(set(names)), f"duplicate objects: {names}"


@pytest.mark.parametrize("values_file", [None, *mc.CI_VALUES], ids=["defaults", *CI_IDS])
def test_helm_lint_reports_no_errors_or_warnings(values_file: Path | None) -> None:
    values = mc.load_yaml(values_file) if values_file else None
    report = helm_python.lint(str(mc.CHART), values, strict=True, kube_version="v1.29.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not problems, report


@pytest.mark.parametrize("version", mc.K8S_VERSIONS)
@pytest.mark.parametrize("values_file", mc.CI_VALUES, ids=CI_IDS)
def test_core_objects_validate_strictly(values_file: Path, version: str) -> None:
    core = [d for d in mc.ci_docs(values_file) if d["kind"] not in mc.CUSTOM_KINDS]
    assert core
    for doc in core:
        mc.validate_core(doc, version)


@pytest.mark.parametrize("version", mc.K8S_VERSIONS)
@pytest.mark.parametrize("values_file", mc.CI_VALUES, ids=CI_IDS)
def test_rayjob_pod_templates_validate_strictly_as_core_pods(values_file: Path, version: str) -> None:
    rayjobs = mc.by_kind(mc.ci_docs(values_file), "RayJob")
    assert rayjobs
    for rayjob in rayjobs:
        mc.validate_pod_templates(rayjob, version)


@pytest.mark.parametrize("values_file", mc.CI_VALUES, ids=CI_IDS)
def test_custom_resources_have_the_fields_their_operators_require(values_file: Path) -> None:
    custom = [d for d in mc.ci_docs(values_file) if d["kind"] in mc.CUSTOM_KINDS]
    assert custom
    problems = [p for d in custom for p in mc.check_custom(d)]
    assert not problems, "\n".join(problems)


def test_operator_checks_catch_broken_custom_resources() -> None:
    docs = mc.ci_docs(mc.CHART / "ci" / "elastic-gpu-values.yaml")
    rayjob = mc.one(docs, "RayJob", "-train")
    rayjob["spec"]["shutdownAfterJobFinish"] = True
    group = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    group["replicas"] = "3"
    del group["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]
    problems = "\n".join(mc.check_custom(rayjob))
    assert "shutdownAfterJobFinish" in problems and "'3' is not of type 'integer'" in problems
    group["replicas"] = 9
    del rayjob["spec"]["shutdownAfterJobFinish"]
    problems = "\n".join(mc.check_custom(rayjob))
    assert "replicas outside" in problems and "no memory limit" in problems
    monitor = mc.one(docs, "PodMonitor", "-trainer")
    monitor["spec"]["podMetricsEndpoints"][0]["interval"] = "15 seconds"
    assert mc.check_custom(monitor)


@pytest.mark.parametrize("values_file", mc.CI_VALUES, ids=CI_IDS)
def test_run_config_in_configmap_passes_trip_config_validate(values_file: Path, tmp_path: Path) -> None:
    configmap = mc.one(mc.ci_docs(values_file), "ConfigMap", "-config")
    config = tmp_path / "config.yaml"
    config.write_text(configmap["data"]["config.yaml"])
    result = subprocess.run([sys.executable, "-m", "trip.cli", "config", "validate", "--config", str(config)],
                            capture_output=True, text=True, cwd=mc.REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


@pytest.mark.parametrize("values_file", mc.CI_VALUES, ids=CI_IDS)
def test_worker_group_sizes_match_run_config_scaling(values_file: Path, tmp_path: Path) -> None:
    from trip.config import load_config

    docs = mc.ci_docs(values_file)
    (tmp_path / "config.yaml").write_text(mc.one(docs, "ConfigMap", "-config")["data"]["config.yaml"])
    cfg = load_config(tmp_path / "config.yaml")
    values = helm_python.Chart.load(str(mc.CHART)).merge_values(mc.load_yaml(values_file))
    for rayjob in mc.by_kind(docs, "RayJob"):
        if not rayjob["metadata"]["name"].endswith("-train"):
            continue
        per_pod = values["train"]["workers"]["workersPerPod"]
        group = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
        sizes = [group["minReplicas"] * per_pod, group["maxReplicas"] * per_pod]
        assert sizes == [min(cfg.scaling.world_sizes), max(cfg.scaling.world_sizes)]
        assert group["replicas"] * per_pod in cfg.scaling.world_sizes
        gpus = group["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)
        assert gpus == (per_pod * cfg.scaling.gpus_per_worker if cfg.scaling.use_gpu else 0)


def test_training_rayjob_runs_the_train_driver_with_the_mounted_config() -> None:
    docs = mc.ci_docs(mc.CHART / "ci" / "minimal-values.yaml")
    rayjob = mc.one(docs, "RayJob", "-train")
    spec = rayjob["spec"]
    assert spec["entrypoint"] == "python -m pipelines.train --config /etc/trip/config.yaml"
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and isinstance(spec["backoffLimit"], int)
    configmap = mc.one(docs, "ConfigMap", "-config")["metadata"]["name"]
    for where, template in mc.pod_templates(rayjob):
        if where == "submitter":
            continue
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        assert volumes["run-config"]["configMap"]["name"] == configmap, where
        mounts = {m["mountPath"]: m for m in template["spec"]["containers"][0]["volumeMounts"]}
        assert mounts["/etc/trip"]["readOnly"] is True, where


def test_extra_args_and_deadline_reach_the_training_rayjob() -> None:
    docs = mc.render_docs({"train": {"extraArgs": ["--set", "train.max_steps=10"], "activeDeadlineSeconds": 7200}})
    spec = mc.one(docs, "RayJob", "-train")["spec"]
    assert spec["entrypoint"].endswith("--config /etc/trip/config.yaml --set train.max_steps=10")
    assert spec["activeDeadlineSeconds"] == 7200
    assert "activeDeadlineSeconds" not in mc.one(mc.render_docs(), "RayJob", "-train")["spec"]


def test_preprocessing_rayjob_is_rendered_only_when_enabled() -> None:
    assert not [d for d in mc.render_docs() if d["metadata"]["name"].endswith("-preprocess")]
    docs = mc.ci_docs(mc.CHART / "ci" / "preprocessing-only-values.yaml")
    (rayjob,) = mc.by_kind(docs, "RayJob")
    assert rayjob["metadata"]["name"].endswith("-preprocess")
    assert rayjob["spec"]["entrypoint"] == "python -m pipelines.preprocess --config /etc/trip/config.yaml"
    group = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_elastic_run_enables_the_in_tree_autoscaler_with_its_rbac() -> None:
    docs = mc.ci_docs(mc.CHART / "ci" / "elastic-gpu-values.yaml")
    cluster = mc.one(docs, "RayJob", "-train")["spec"]["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]["idleTimeoutSeconds"] == 120
    group = cluster["workerGroupSpecs"][0]
    assert (group["minReplicas"], group["replicas"], group["maxReplicas"]) == (2, 3, 3)
    # Only the head pod (where the autoscaler sidecar runs) gets an API token.
    assert cluster["headGroupSpec"]["template"]["spec"]["automountServiceAccountToken"] is True
    assert group["template"]["spec"]["automountServiceAccountToken"] is False
    binding = mc.one(docs, "RoleBinding")
    assert binding["roleRef"]["name"] == mc.one(docs, "Role")["metadata"]["name"]
    assert binding["subjects"][0]["name"] == mc.one(docs, "ServiceAccount")["metadata"]["name"]


def test_role_grants_only_what_the_autoscaler_needs() -> None:
    role = mc.one(mc.ci_docs(mc.CHART / "ci" / "elastic-gpu-values.yaml"), "Role")
    granted = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"]
               for r in rule["resources"] for v in rule["verbs"]}
    allowed = {("", "pods", v) for v in ("get", "list", "watch", "patch")}
    allowed |= {("ray.io", "rayclusters", v) for v in ("get", "list", "watch", "patch")}
    assert granted <= allowed, granted - allowed


def test_role_and_rolebinding_not_rendered_without_the_autoscaler() -> None:
    kinds = {d["kind"] for d in mc.ci_docs(mc.CHART / "ci" / "minimal-values.yaml")}
    assert not kinds & {"Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"}
    sa = mc.one(mc.ci_docs(mc.CHART / "ci" / "minimal-values.yaml"), "ServiceAccount")
    assert sa["automountServiceAccountToken"] is False


@pytest.mark.parametrize("values_file", mc.CI_VALUES, ids=CI_IDS)
def test_every_ray_pod_runs_non_root_without_privilege_escalation_on_a_read_only_root(values_file: Path) -> None:
    for rayjob in mc.by_kind(mc.ci_docs(values_file), "RayJob"):
        for where, template in mc.pod_templates(rayjob):
            pod = template["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True, where
            assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", where
            for c in pod["containers"]:
                sc = c["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True, where
                assert sc["capabilities"]["drop"] == ["ALL"], where
                mounts = {m["mountPath"] for m in c["volumeMounts"]}
                assert {"/tmp", "/home/trip"} <= mounts, f"{where}: writable dirs missing"


def test_dev_shm_is_a_memory_backed_empty_dir_sized_from_values() -> None:
    rayjob = mc.one(mc.ci_docs(mc.CHART / "ci" / "elastic-gpu-values.yaml"), "RayJob", "-train")
    for where, template in mc.pod_templates(rayjob):
        if where == "submitter":
            continue
        dshm = {v["name"]: v for v in template["spec"]["volumes"]}["dshm"]
        assert dshm["emptyDir"]["medium"] == "Memory", where
        mounts = {m["name"]: m["mountPath"] for m in template["spec"]["containers"][0]["volumeMounts"]}
        assert mounts["dshm"] == "/dev/shm", where
    worker = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]
    assert {v["name"]: v for v in worker["spec"]["volumes"]}["dshm"]["emptyDir"]["sizeLimit"] == "32Gi"


def test_scheduling_values_reach_the_worker_pods() -> None:
    rayjob = mc.one(mc.ci_docs(mc.CHART / "ci" / "elastic-gpu-values.yaml"), "RayJob", "-train")
    pod = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["gpu"]}]}]}}}
    docs = mc.render_docs({"train": {"workers": {"affinity": affinity}}, "queue": {"priorityClassName": "batch-high"}})
    pod = mc.one(docs, "RayJob", "-train")["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert pod["affinity"] == affinity and pod["priorityClassName"] == "batch-high"


def test_training_workers_get_the_preemption_grace_and_a_prestop_that_signals_the_trainers() -> None:
    for grace, want in ((None, 40), (25, 40), (50.5, 66)):
        values = {} if grace is None else {"runConfig": {"run": {"preemption_grace_s": grace}}}
        rayjob = mc.one(mc.render_docs(values), "RayJob", "-train")
        worker = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
        assert worker["terminationGracePeriodSeconds"] == want  # grace (rounded up) + 15 s for ray stop
        hook = " ".join(worker["containers"][0]["lifecycle"]["preStop"]["exec"]["command"])
        assert "pkill -TERM -f 'ray::RayTrainWorker'" in hook and f"seq {want - 15}" in hook
        head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
        assert "terminationGracePeriodSeconds" not in head  # the driver's pod keeps Kubernetes' default


@pytest.mark.parametrize(("values_file", "labels"), [
    ("minimal-values.yaml", {"kueue.x-k8s.io/queue-name": "team-ml"}),
    ("elastic-gpu-values.yaml", {"ray.io/scheduler-name": "volcano", "volcano.sh/queue-name": "training"}),
    ("monitoring-off-values.yaml", {}),
])
def test_queue_labels_select_the_batch_scheduler(values_file: str, labels: dict[str, str]) -> None:
    rayjob = mc.by_kind(mc.ci_docs(mc.CHART / "ci" / values_file), "RayJob")[0]
    queue_keys = {k for k in rayjob["metadata"]["labels"] if "queue" in k or "scheduler" in k}
    assert {k: rayjob["metadata"]["labels"][k] for k in queue_keys} == labels


def test_credentials_come_only_from_the_existing_secret() -> None:
    docs = mc.ci_docs(mc.CHART / "ci" / "elastic-gpu-values.yaml")
    rayjob = mc.one(docs, "RayJob", "-train")
    for where, template in mc.pod_templates(rayjob):
        if where == "submitter":
            continue
        env = mc.env_of(template)
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert "value" not in env[key], where
            assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "trip-object-storage", "key": key}
        assert env["AWS_ENDPOINT_URL"]["value"] == "https://minio.storage.svc:9000"
    text = "\n".join(mc.render(mc.load_yaml(mc.CHART / "ci" / "elastic-gpu-values.yaml")).values())
    assert "AWS_SECRET_ACCESS_KEY\n" not in mc.one(docs, "ConfigMap", "-config")["data"]["config.yaml"]
    assert "kind: Secret" not in text


def test_no_credential_variables_without_an_existing_secret() -> None:
    rayjob = mc.one(mc.render_docs(), "RayJob", "-train")
    for where, template in mc.pod_templates(rayjob):
        env = mc.env_of(template)
        assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"} & set(env), where


def test_networkpolicy_admits_pods_of_the_release_dashboard_and_metrics_scrapes() -> None:
    docs = mc.ci_docs(mc.CHART / "ci" / "elastic-gpu-values.yaml")
    policy = mc.one(docs, "NetworkPolicy")
    rayjob = mc.one(docs, "RayJob", "-train")
    for where, template in mc.pod_templates(rayjob):
        assert mc.selector_matches(policy["spec"]["podSelector"], template["metadata"]["labels"]), where
    ports = [p for rule in policy["spec"]["ingress"] for p in rule.get("ports", [])]
    assert {"port": 8265, "protocol": "TCP"} in ports and {"port": 8080, "protocol": "TCP"} in ports
    assert {"port": 9400, "endPort": 9401, "protocol": "TCP"} in ports
    assert not mc.by_kind(mc.ci_docs(mc.CHART / "ci" / "monitoring-off-values.yaml"), "NetworkPolicy")


def test_release_name_longer_than_63_chars_gives_valid_object_names() -> None:
    docs = mc.render_docs(name="a" * 53)
    for doc in docs:
        assert len(doc["metadata"]["name"]) <= 63, doc["metadata"]["name"]
        if doc["kind"] not in mc.CUSTOM_KINDS:
            mc.validate_core(doc, "1.32.0")
    assert not [p for d in docs if d["kind"] in mc.CUSTOM_KINDS for p in mc.check_custom(d)]


def test_notes_tell_how_to_follow_the_job() -> None:
    notes = mc.render()["trip/templates/NOTES.txt"]
    assert "kubectl -n ml get rayjob trip-train -w" in notes
    assert "logs -f job/trip-train" in notes
