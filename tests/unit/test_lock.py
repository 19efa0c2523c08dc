"""constraints-cpu.txt is a complete lock of pyproject.toml: every dependency (and dev extra)
is pinned there, at a version its specifier allows."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]


def _lock() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints-cpu.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints-cpu.txt: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = Version(version)
    return pins


def test_every_dependency_is_pinned_at_an_allowed_version():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["dev"]
    pins = _lock()
    for text in wanted:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} (pyproject.toml) is not in constraints-cpu.txt: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"constraints-cpu.txt pins {req.name}=={pins[name]}, outside pyproject.toml's {req.specifier}: "
            f"run `make lock`")


def test_the_lock_keeps_the_cpu_torch_build():
    assert _lock()["torch"] == Version("2.13.0")
