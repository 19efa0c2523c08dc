"""The container image recipe, checked by parsing (no container engine on these machines):
non-root user, CUDA torch, DeepSpeed ops compiled at build time, and the entrypoints the
RayJobs run all present."""

from __future__ import annotations

import re

import pytest

from tests.helm import manifest_checks as mc

pytestmark = pytest.mark.helm

DOCKERFILE = mc.REPO / "k8s" / "image" / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with comments dropped, then continuations joined (as Docker does)."""
    lines = [ln for ln in DOCKERFILE.read_text().splitlines() if not ln.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for ins in instructions():
        if ins[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def test_final_stage_runs_as_a_numeric_non_root_user() -> None:
    final = stages()[-1]
    users = [arg for word, arg in final if word == "USER"]
    assert users, "the runtime stage sets no USER (it would run as root)"
    user = users[-1].split(":")[0]
    assert user.isdigit() and int(user) != 0, f"USER {users[-1]} must be a numeric non-root uid"
    # The chart's podSecurityContext runs as the same uid.
    assert int(user) == mc.load_yaml(mc.CHART / "values.yaml")["podSecurityContext"]["runAsUser"]
    created = " ".join(arg for word, arg in final if word == "RUN")
    assert f"--uid {user}" in created


def test_images_are_cuda_and_torch_comes_from_a_cuda_index() -> None:
    froms = [arg for stage in stages() for word, arg in stage if word == "FROM"]
    assert len(froms) == 2 and all(f.startswith("nvidia/cuda:") for f in froms)
    assert "devel" in froms[0] and "runtime" in froms[-1]
    text = DOCKERFILE.read_text()
    assert re.search(r"TORCH_INDEX=https://download\.pytorch\.org/whl/cu\d+", text)
    assert "--index-url ${TORCH_INDEX} torch==${TORCH_VERSION}" in text


def test_deepspeed_fused_ops_are_compiled_at_build_time() -> None:
    runs = " ".join(arg for word, arg in stages()[0] if word == "RUN")
    for flag in ("DS_BUILD_FUSED_ADAM=1", "DS_BUILD_CPU_ADAM=1", "DS_BUILD_UTILS=1"):
        assert flag in runs, flag
    assert "pip install --no-build-isolation deepspeed" in runs
    assert "import deepspeed.ops.adam.fused_adam" in runs  # the build fails if the op is missing


def test_image_holds_ray_the_project_and_the_job_entrypoints() -> None:
    text = DOCKERFILE.read_text()
    assert '"ray[train,data,default]==${RAY_VERSION}"' in text
    for copied in ("trip", "data_tools", "pipelines"):
        assert re.search(rf"^COPY {copied} \./{copied}$", text, re.M), copied
    # The RayJobs run these modules; the chart and the Dockerfile must name the same ones.
    for module in ("pipelines.train", "pipelines.preprocess"):
        assert f"python -m {module} --config /etc/trip/config.yaml" in text
        rayjobs = " ".join(mc.render(mc.load_yaml(mc.CHART / "ci" / f"{ci}-values.yaml"))
                           .get(f"trip/templates/rayjob-{kind}.yaml", "")
                           for ci, kind in (("minimal", "train"), ("preprocessing-only", "preprocess")))
        assert f"python -m {module} --config /etc/trip/config.yaml" in rayjobs
    cmd = [arg for word, arg in stages()[-1] if word == "CMD"]
    assert cmd == ['["trip", "--help"]']
    env = " ".join(arg for word, arg in stages()[-1] if word == "ENV")
    assert "PATH=/opt/venv/bin:$PATH" in env and "HOME=/home/trip" in env


def test_build_context_is_limited_to_the_sources() -> None:
    ignore = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
    assert ignore[ignore.index("*")] == "*"
    assert {"!trip/**", "!pipelines/**", "!data_tools/**", "!monitoring/**"} <= set(ignore)
