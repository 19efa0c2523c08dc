"""Offline checks of rendered manifests, shared by the Helm and kustomize tests.

Why here and hand-written: there is no cluster, and `kubernetes-validate` knows only core
kinds. Core objects are validated strictly against the Kubernetes OpenAPI schemas of
1.29-1.32. Custom resources get the checks their operators would apply (KubeRay for
RayJob, the Prometheus operator for PodMonitor/PrometheusRule), written as small
JSON schemas plus relations a schema cannot state; and every pod template inside a
RayJob is validated strictly as a core Pod, which is what KubeRay turns it into.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "trip"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
K8S_VERSIONS = ["1.29.0", "1.30.0", "1.31.0", "1.32.0"]
CUSTOM_KINDS = {"RayJob", "PodMonitor", "PrometheusRule"}

Doc = dict[str, Any]


# --------------------------------------------------------------------------- rendering


@functools.lru_cache(maxsize=1)
def chart() -> Any:
    import helm_python

    return helm_python.Chart.load(str(CHART))


def render(values: dict[str, Any] | None = None, name: str = "trip", namespace: str = "ml") -> dict[str, str]:
    """Template path -> rendered text (empty templates dropped)."""
    out = chart().render(values or {}, name=name, namespace=namespace)
    return {k: v for k, v in out.items() if v.strip()}


def render_docs(values: dict[str, Any] | None = None, **kw: Any) -> list[Doc]:
    """Every object the chart renders for `values` (NOTES.txt left out)."""
    docs: list[Doc] = []
    for path, text in render(values, **kw).items():
        if path.endswith(".yaml"):
            docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


@functools.cache
def _ci_docs(path: str) -> tuple[Doc, ...]:
    return tuple(render_docs(load_yaml(Path(path))))


def ci_docs(path: Path) -> list[Doc]:
    """Rendered objects for one ci/*-values.yaml (cached: the same render feeds many tests)."""
    import copy

    return copy.deepcopy(list(_ci_docs(str(path))))


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text()) or {}


def by_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[Doc], kind: str, name_suffix: str = "") -> Doc:
    found = [d for d in by_kind(docs, kind) if d["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"expected one {kind} *{name_suffix}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


# --------------------------------------------------------------------------- core objects


def validate_core(doc: Doc, version: str) -> None:
    """Strict OpenAPI validation of a core object; raises AssertionError naming the object."""
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        first = str(e).splitlines()[0]
        raise AssertionError(f"{doc['kind']}/{doc['metadata'].get('name')} invalid for Kubernetes {version}: {first}") from None


def pod_templates(rayjob: Doc) -> Iterator[tuple[str, Doc]]:
    """(where, pod template) for the submitter, head and every worker group of a RayJob."""
    spec = rayjob["spec"]
    if "submitterPodTemplate" in spec:
        yield "submitter", spec["submitterPodTemplate"]
    cluster = spec["rayClusterSpec"]
    yield "head", cluster["headGroupSpec"]["template"]
    for group in cluster.get("workerGroupSpecs", []):
        yield f"worker group {group['groupName']}", group["template"]


def as_pod(template: Doc, name: str) -> Doc:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, **template.get("metadata", {})}, "spec": template["spec"]}


def validate_pod_templates(rayjob: Doc, version: str) -> None:
    """Each pod template of a RayJob is a valid core Pod for `version`, strictly."""
    for where, template in pod_templates(rayjob):
        validate_core(as_pod(template, f"{rayjob['metadata']['name']}-{where.replace(' ', '-')}"), version)


# --------------------------------------------------------------------------- custom resources

_DNS1123 = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA = {"type": "object", "required": ["name"], "properties": {
    "name": {"type": "string", "pattern": _DNS1123, "maxLength": 63},
    "namespace": {"type": "string"}, "labels": _STRING_MAP, "annotations": _STRING_MAP}}
_POD_TEMPLATE = {"type": "object", "required": ["spec"], "properties": {
    "metadata": {"type": "object", "properties": {"labels": _STRING_MAP, "annotations": _STRING_MAP}},
    "spec": {"type": "object", "required": ["containers"],
             "properties": {"containers": {"type": "array", "minItems": 1}}}}}

# What KubeRay's RayJob v1 CRD and controller insist on (fields used by this project).
RAYJOB_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayJob"}, "metadata": _METADATA,
        "spec": {"type": "object", "additionalProperties": False,
                 "required": ["entrypoint", "rayClusterSpec"],
                 "properties": {
                     "entrypoint": {"type": "string", "minLength": 1},
                     "shutdownAfterJobFinishes": {"type": "boolean"},
                     "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                     "backoffLimit": {"type": "integer", "minimum": 0},
                     "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
                     "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
                     "submitterPodTemplate": _POD_TEMPLATE,
                     "suspend": {"type": "boolean"},
                     "rayClusterSpec": {
                         "type": "object", "additionalProperties": False, "required": ["headGroupSpec"],
                         "properties": {
                             "rayVersion": {"type": "string"},
                             "authOptions": {"type": "object", "additionalProperties": False, "properties": {
                                 "mode": {"enum": ["disabled", "token"]}}},
                             "enableInTreeAutoscaling": {"type": "boolean"},
                             "autoscalerOptions": {"type": "object", "additionalProperties": False, "properties": {
                                 "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
                                 "idleTimeoutSeconds": {"type": "integer", "minimum": 0},
                                 "imagePullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
                                 "resources": {"type": "object"}, "securityContext": {"type": "object"},
                                 "env": {"type": "array"}, "envFrom": {"type": "array"},
                                 "volumeMounts": {"type": "array"}, "image": {"type": "string"}}},
                             "headGroupSpec": {"type": "object", "additionalProperties": False,
                                               "required": ["template"], "properties": {
                                                   "rayStartParams": _STRING_MAP, "template": _POD_TEMPLATE,
                                                   "serviceType": {"type": "string"}}},
                             "workerGroupSpecs": {"type": "array", "items": {
                                 "type": "object", "additionalProperties": False,
                                 "required": ["groupName", "minReplicas", "maxReplicas", "template"],
                                 "properties": {
                                     "groupName": {"type": "string", "pattern": _DNS1123},
                                     "replicas": {"type": "integer", "minimum": 0},
                                     "minReplicas": {"type": "integer", "minimum": 0},
                                     "maxReplicas": {"type": "integer", "minimum": 0},
                                     "rayStartParams": _STRING_MAP, "template": _POD_TEMPLATE}}},
                         }},
                 }},
    },
}

# The Prometheus operator's PodMonitor (monitoring.coreos.com/v1), fields used here.
PODMONITOR_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "PodMonitor"},
        "metadata": _METADATA,
        "spec": {"type": "object", "additionalProperties": False, "required": ["selector"], "properties": {
            "selector": {"type": "object", "additionalProperties": False, "properties": {
                "matchLabels": _STRING_MAP,
                "matchExpressions": {"type": "array", "items": {
                    "type": "object", "required": ["key", "operator"], "additionalProperties": False,
                    "properties": {"key": {"type": "string"}, "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                                   "values": {"type": "array", "items": {"type": "string"}}}}}}},
            "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": {
                "type": "object", "additionalProperties": False, "required": ["port"], "properties": {
                    "port": {"type": "string", "minLength": 1}, "path": {"type": "string", "pattern": "^/"},
                    "interval": {"type": "string", "pattern": _DURATION}, "honorLabels": {"type": "boolean"},
                    "relabelings": {"type": "array", "items": {"type": "object", "properties": {
                        "sourceLabels": {"type": "array", "items": {"type": "string", "pattern": "^[a-zA-Z_][a-zA-Z0-9_]*$"}},
                        "targetLabel": {"type": "string"}}}}}}},
            "namespaceSelector": {"type": "object"}}},
    },
}

# The Prometheus operator's PrometheusRule (monitoring.coreos.com/v1).
PROMETHEUSRULE_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "PrometheusRule"},
        "metadata": _METADATA,
        "spec": {"type": "object", "additionalProperties": False, "required": ["groups"], "properties": {
            "groups": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["name", "rules"], "additionalProperties": False, "properties": {
                    "name": {"type": "string", "minLength": 1}, "interval": {"type": "string", "pattern": _DURATION},
                    "rules": {"type": "array", "minItems": 1, "items": {
                        "type": "object", "required": ["expr"], "additionalProperties": False,
                        "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                        "properties": {
                            "alert": {"type": "string"}, "record": {"type": "string"},
                            "expr": {"type": "string", "minLength": 1},
                            "for": {"type": "string", "pattern": _DURATION},
                            "labels": _STRING_MAP, "annotations": _STRING_MAP}}}}}}}},
    },
}

SCHEMAS = {"RayJob": RAYJOB_SCHEMA, "PodMonitor": PODMONITOR_SCHEMA, "PrometheusRule": PROMETHEUSRULE_SCHEMA}


def check_custom(doc: Doc) -> list[str]:
    """Problems the operator of this custom resource would reject it for (empty: fine)."""
    schema = SCHEMAS[doc["kind"]]
    problems = [f"{doc['kind']}/{doc['metadata'].get('name')} at /{'/'.join(map(str, e.absolute_path))}: {e.message}"
                for e in jsonschema.Draft7Validator(schema).iter_errors(doc)]
    if doc["kind"] == "RayJob" and not problems:
        problems += _rayjob_relations(doc)
    return problems


def _rayjob_relations(doc: Doc) -> list[str]:
    name = doc["metadata"]["name"]
    problems = []
    if len(name) > 47:  # KubeRay: the RayCluster and head Service names derive from it
        problems.append(f"RayJob/{name}: name longer than 47 characters")
    for group in doc["spec"]["rayClusterSpec"].get("workerGroupSpecs", []):
        lo, hi = group["minReplicas"], group["maxReplicas"]
        if not lo <= group.get("replicas", lo) <= hi:
            problems.append(f"RayJob/{name} group {group['groupName']}: replicas outside minReplicas..maxReplicas")
    for where, template in pod_templates(doc):
        for c in template["spec"]["containers"]:
            names = [p["name"] for p in c.get("ports", [])]
            if len(names) != len(set(names)):
                problems.append(f"RayJob/{name} {where}: duplicate container port names {names}")
            for port_name in names:
                if len(port_name) > 15 or not re.match(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", port_name):
                    problems.append(f"RayJob/{name} {where}: port name {port_name!r} is not an IANA service name")
            if where != "submitter":
                # KubeRay derives Ray's CPU/memory/GPU resources from the container limits.
                limits = c.get("resources", {}).get("limits", {})
                for key in ("cpu", "memory"):
                    if key not in limits:
                        problems.append(f"RayJob/{name} {where}: container {c['name']} has no {key} limit")
    return problems


def selector_matches(selector: Doc, labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics (matchLabels and matchExpressions)."""
    for k, v in selector.get("matchLabels", {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions", []):
        present, value = e["key"] in labels, labels.get(e["key"])
        op = e["operator"]
        if op == "In" and value not in e["values"]:
            return False
        if op == "NotIn" and present and value in e["values"]:
            return False
        if op == "Exists" and not present:
            return False
        if op == "DoesNotExist" and present:
            return False
    return True


def container_ports(template: Doc) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])}


def env_of(template: Doc) -> dict[str, Doc]:
    """Environment of the first container, by variable name."""
    return {e["name"]: e for e in template["spec"]["containers"][0].get("env", [])}
