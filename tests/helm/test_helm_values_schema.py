"""values.yaml and values.schema.json: every key documented, bad values refused with a
message that names the key (the schema for shapes, the templates for relations)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
from typing import Any

import helm_python
import pytest
import yaml

from tests.helm import manifest_checks as mc

pytestmark = pytest.mark.helm

VALUES_TEXT = (mc.CHART / "values.yaml").read_text()
SCHEMA = json.loads((mc.CHART / "values.schema.json").read_text())


def rejection(values: dict[str, Any]) -> str:
    """The error message Helm gives for `values` (schema first, then the templates)."""
    chart = mc.chart()
    with pytest.raises((helm_python.HelmValuesError, helm_python.HelmRenderError)) as info:
        chart.validate_schema(values)
        chart.render(values, name="trip", namespace="ml")
    return str(info.value)


@pytest.mark.parametrize(("values", "names"), [
    ({"train": {"workers": {"replicas": -1}}}, "/train/workers/replicas"),
    ({"preprocess": {"workers": {"minReplicas": -2}}}, "/preprocess/workers/minReplicas"),
    ({"replicas": 3}, "'replicas' not allowed"),
    ({"train": {"worker": {}}}, "'worker' not allowed"),
    ({"runConfig": {"trainer": {}}}, "'trainer' not allowed"),
    ({"monitoring": {"enable": True}}, "'enable' not allowed"),
    ({"train": {"backoffLimit": "3"}}, "/train/backoffLimit"),
    ({"train": {"enabled": "yes"}}, "/train/enabled"),
    ({"train": {"workers": {"gpus": 1.5}}}, "/train/workers/gpus"),
    ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    ({"queue": {"kind": "slurm"}}, "/queue/kind"),
    ({"runConfig": {"metrics": {"port": 70000}}}, "/runConfig/metrics/port"),
    ({"objectStorage": {"endpoint": "minio:9000"}}, "/objectStorage/endpoint"),
    ({"train": {"head": {"resources": {"requests": {"cpu": "four"}, "limits": {}}}}}, "/train/head/resources/requests/cpu"),
    ({"extraEnv": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}]}, "/extraEnv/0/name"),
])
def test_schema_rejects_bad_values_naming_the_key(values: dict[str, Any], names: str) -> None:
    assert names in rejection(values)


@pytest.mark.parametrize(("values", "names"), [
    ({"train": {"workers": {"minReplicas": 5, "maxReplicas": 4}}}, "train.workers.minReplicas (5) must be <= train.workers.maxReplicas (4)"),
    ({"preprocess": {"enabled": True, "workers": {"minReplicas": 3, "maxReplicas": 2}}}, "preprocess.workers.minReplicas"),
    ({"train": {"workers": {"replicas": 2}}}, "train.workers.replicas (2) must lie within"),
    ({"train": {"workers": {"replicas": 3, "minReplicas": 3, "maxReplicas": 3}}}, "runConfig.scaling.num_workers (4)"),
    ({"runConfig": {"scaling": {"min_workers": 2, "max_workers": 4}}}, "must equal runConfig.scaling.min_workers (2)"),
    ({"train": {"workers": {"gpus": 2}}}, "train.workers.gpus (2) must equal workersPerPod x runConfig.scaling.gpus_per_worker"),
    ({"runConfig": {"scaling": {"use_gpu": False}}}, "runConfig.scaling.use_gpu is false"),
    ({"train": {"workers": {"resources": {"limits": {"cpu": "4000m"}}}}}, "train.workers.resources.limits.cpu (4000m) is below"),
    ({"runConfig": {"scaling": {"cpus_per_worker": 12}}}, "train.workers.resources.limits.cpu (8) is below"),
    ({"runConfig": {"metrics": {"port": 8080}}}, "runConfig.metrics.port 8080..8080"),
    ({"runConfig": {"run": {"storage_path": "./runs"}}}, "runConfig.run.storage_path \"./runs\" is a local path"),
    ({"queue": {"kind": "kueue", "name": "q"}, "train": {"autoscaler": {"enabled": True}}}, "queue.kind=kueue"),
    ({"queue": {"kind": "volcano"}}, "queue.name is required"),
    ({"train": {"enabled": False}}, "nothing to deploy"),
])
def test_templates_reject_inconsistent_values_naming_the_keys(values: dict[str, Any], names: str) -> None:
    assert names in rejection(values)


@pytest.mark.parametrize(("values", "names"), [
    ({"runConfig": {"train": {"max_stepz": 5}}}, "at '/runConfig/train': additional properties 'max_stepz' not allowed"),
    ({"runConfig": {"model": {"unet": {"layers": 2}}}}, "at '/runConfig/model/unet': additional properties 'layers' not allowed"),
    ({"runConfig": {"train": {"max_steps": "5k"}}}, "at '/runConfig/train/max_steps': got string, want integer"),
    ({"runConfig": {"train": {"max_steps": 2.5}}}, "at '/runConfig/train/max_steps': got number, want integer"),
    ({"runConfig": {"data": {"pin_memory": "yes"}}}, "at '/runConfig/data/pin_memory': got string, want boolean"),
    ({"runConfig": {"train": {"betas": [0.9]}}}, "at '/runConfig/train/betas': minItems: got 1, want 2"),
    ({"runConfig": {"train": {"precision": "fp16"}}}, "at '/runConfig/train/precision': value must be one of 'fp32', 'bf16'"),
    ({"runConfig": {"codec": {"kind": "taesd"}}}, "at '/runConfig/codec/kind': value must be one of 'lossless', 'vae'"),
    ({"runConfig": {"model": {"latent_size": [32, 56, 4]}}}, "at '/runConfig/model/latent_size'"),
])
def test_schema_rejects_a_misspelt_or_mistyped_run_config_key_naming_it(values: dict[str, Any], names: str) -> None:
    assert names in rejection(values)


@pytest.mark.parametrize("values", [
    {"runConfig": {"train": {"lr_unet": 1}}},  # an integer where a float is expected, as the loader allows
    {"runConfig": {"scaling": {"min_workers": None, "max_workers": None}}},  # Optional fields take null
    {"runConfig": {"sample": {"steps": 25}}},  # a partial section: helm merges it over the defaults
    {"runConfig": {"model": {"latent_size": [32, 56]}, "preprocess": {"resolution": [256, 448]}}},  # [h, w]
])
def test_schema_accepts_what_the_run_config_loader_accepts(values: dict[str, Any]) -> None:
    mc.chart().validate_schema(values)


def test_install_with_a_misspelt_run_config_key_fails_before_rendering() -> None:
    """`helm install`/`template` validate values the same way: nothing reaches the cluster."""
    with pytest.raises(helm_python.HelmValuesError, match="additional properties 'max_stepz' not allowed"):
        mc.chart().render({"runConfig": {"train": {"max_stepz": 5}}}, name="trip", namespace="ml")


def test_render_itself_applies_the_schema() -> None:
    """`helm install` validates against values.schema.json; so does the SDK's render."""
    with pytest.raises(helm_python.HelmValuesError, match="/train/workers/replicas"):
        mc.chart().render({"train": {"workers": {"replicas": -1}}}, name="trip", namespace="ml")


def test_defaults_and_every_ci_file_pass_the_schema() -> None:
    mc.chart().validate_schema({})
    for path in mc.CI_VALUES:
        mc.chart().validate_schema(mc.load_yaml(path))


def test_schema_is_draft07_and_closes_every_chart_owned_object() -> None:
    assert SCHEMA["$schema"] == "http://json-schema.org/draft-07/schema#"

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node:
                assert node.get("additionalProperties") is False, f"schema {where or '/'} is open"
            for key, child in node.items():
                walk(child, f"{where}/{key}")
        elif isinstance(node, list):
            for i, child in enumerate(node):
                walk(child, f"{where}/{i}")

    walk(SCHEMA, "")


def test_schema_run_config_sections_are_exactly_trip_config_sections() -> None:
    from trip.config import Config

    sections = set(SCHEMA["properties"]["runConfig"]["properties"])
    assert sections == {f.name for f in dataclasses.fields(Config)}


def test_generated_schema_defaults_and_values_table_equal_a_fresh_generation() -> None:
    spec = importlib.util.spec_from_file_location("helm_generate", mc.REPO / "helm" / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    stale = [str(path.relative_to(mc.REPO)) for path in generate.stale_files()]
    assert not stale, f"{stale} differ from a fresh generation: run `make helm-schema` (python helm/generate.py)"


def test_default_run_config_is_base_256_apart_from_the_charts_scaling(tmp_path) -> None:
    from trip.config import load_config

    (tmp_path / "config.yaml").write_text(mc.one(mc.render_docs(), "ConfigMap", "-config")["data"]["config.yaml"])
    rendered = load_config(tmp_path / "config.yaml").to_dict()
    base = load_config(mc.REPO / "pipelines" / "configs" / "base_256.yaml").to_dict()
    assert {k: v for k, v in rendered.items() if k != "scaling"} == {k: v for k, v in base.items() if k != "scaling"}


def test_values_yaml_points_editors_to_the_schema() -> None:
    assert VALUES_TEXT.splitlines()[0] == "# yaml-language-server: $schema=values.schema.json"


def test_every_values_key_has_a_doc_comment() -> None:
    """helm-docs style: a `# --` comment block right above every key. A comment also covers
    the value below it (resources, securityContext, runConfig fields), and a plain section
    such as `image:` needs none when each of its keys has one."""
    keys = _values_keys(VALUES_TEXT.splitlines())
    documented = {path for path, has_doc in keys if has_doc}
    parents = {path[:-1] for path, _ in keys}
    undocumented = [".".join(path) for path, _ in keys
                    if path not in parents and not any(path[:n] in documented for n in range(1, len(path) + 1))]
    assert not undocumented, f"keys without a '# --' comment: {undocumented}"
    sections = {path[1] for path in documented if path[0] == "runConfig" and len(path) == 2}
    assert sections >= {"model", "codec", "preprocess", "data", "train", "scaling", "run", "metrics"}


def _values_keys(lines: list[str]) -> list[tuple[tuple[str, ...], bool]]:
    """(dotted path, has a `# --` comment block right above) for every mapping key."""
    out: list[tuple[tuple[str, ...], bool]] = []
    stack: list[tuple[int, str]] = []
    for i, line in enumerate(lines):
        m = re.match(r"^( *)(?:- )?([A-Za-z_][\w./-]*):", line)
        if not m or line.lstrip().startswith("#"):
            continue
        indent = len(m.group(1)) + (2 if line.lstrip().startswith("- ") else 0)
        stack = [(d, k) for d, k in stack if d < indent] + [(indent, m.group(2))]
        j = i - 1
        while j >= 0 and lines[j].strip().startswith("#") and not lines[j].strip().startswith("# --"):
            j -= 1
        out.append((tuple(k for _, k in stack), j >= 0 and lines[j].strip().startswith("# --")))
    return out


def test_values_yaml_holds_no_credentials() -> None:
    """Only references to a Secret: no key meant for a credential value, no key-shaped string."""
    allowed = {"existingSecret", "accessKeyIdKey", "secretAccessKeyKey", "imagePullSecrets"}
    credential_key = re.compile(r"password|passwd|secret|token|access_?key|credential", re.I)
    found = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if credential_key.search(str(key)) and key not in allowed:
                    found.append(f"{path}.{key}")
                walk(value, f"{path}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}[{i}]")
        elif isinstance(node, str) and re.search(r"AKIA[0-9A-Z]{16}", node):
            found.append(path)

    walk(yaml.safe_load(VALUES_TEXT), "")
    assert not found, found
