"""Write the chart's generated parts: the runConfig schema, its defaults and the values table.

Why: `helm install` validates values against values.schema.json, so a runConfig that is
checked key by key there fails at install time, naming the key, instead of in the driver
pod after the GPUs were provisioned. Hand-kept copies drift, so all three come from one
source each:

- values.schema.json `properties.runConfig`: from the config dataclasses
  (trip.config_schema), plus the few ranges the templates rely on (BOUNDS below);
- values.yaml, between the BEGIN/END lines under `runConfig`: every section of
  pipelines/configs/base_256.yaml except `scaling`, which the chart owns because it must
  agree with its own worker-group sizes (train.workers);
- README.md, between the BEGIN/END lines: one row per `# --` documented key of values.yaml
  (helm-docs style: Key | Type | Default | Description).

The rest of each file is hand-written and kept as it is. A test fails when a committed
file differs from a fresh generation.

    make helm-schema                  # = python helm/generate.py: rewrite the generated parts
    python helm/generate.py --check   # exit 1 and name the stale files
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
import typing
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's trip, also in a worktree or without an install

from trip.config import Config, load_config  # noqa: E402
from trip.config_schema import object_schema  # noqa: E402

CHART = REPO / "helm" / "trip"
SCHEMA_PATH = CHART / "values.schema.json"
VALUES_PATH = CHART / "values.yaml"
README_PATH = CHART / "README.md"
BASE_CONFIG = REPO / "pipelines" / "configs" / "base_256.yaml"
REGENERATE = "make helm-schema"

# Sections the chart keeps by hand: runConfig.scaling must match train.workers (the templates
# refuse a mismatch), and base_256.yaml is sized for 512 GPUs, the chart's default for 4 pods.
CHART_OWNED = ("scaling",)
# Ranges the templates rely on (ports they open, pod counts they multiply); every other rule
# between fields is the strict loader's, run by the driver.
BOUNDS = {
    "metrics.port": {"minimum": 0, "maximum": 65535},
    "preprocess.metrics_port": {"minimum": 0, "maximum": 65535},
    "scaling.num_workers": {"minimum": 1},
    "scaling.min_workers": {"minimum": 1},
    "scaling.max_workers": {"minimum": 1},
    "scaling.gpus_per_worker": {"exclusiveMinimum": 0},
    "scaling.cpus_per_worker": {"exclusiveMinimum": 0},
}

VALUES_BEGIN = (f"# BEGIN generated from pipelines/configs/base_256.yaml by `{REGENERATE}`; "
                "edit that file, not this block")
VALUES_END = "# END generated"
README_BEGIN = f"<!-- BEGIN values table: generated from values.yaml by `{REGENERATE}` -->"
README_END = "<!-- END values table -->"
CONFIG_DOC = "../../docs/CONFIG.md"
BASE_CONFIG_LINK = "[base_256.yaml](../../pipelines/configs/base_256.yaml)"


# --------------------------------------------------------------------------- schema


def run_config_schema() -> dict[str, Any]:
    """properties.runConfig of values.schema.json: the closed Config schema plus BOUNDS."""
    schema = object_schema(Config)
    schema["description"] = (
        "The run config (trip.config.Config), generated from trip/config.py: closed sections, "
        "field types and choices. The driver's strict loader also checks the rules between fields.")
    for dotted, bounds in BOUNDS.items():
        node = schema
        for part in dotted.split("."):
            node = node["properties"][part]  # a KeyError names a BOUNDS key the config lost
        node.update(bounds)
    return schema


def generated_schema(schema_text: str) -> str:
    schema = json.loads(schema_text)
    schema["properties"]["runConfig"] = run_config_schema()
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


# --------------------------------------------------------------------------- values.yaml


def base_run_config() -> dict[str, Any]:
    """The sections of base_256.yaml the chart takes, with the keys written there, in its
    order, and the values as trip's loader reads them (so `2.0e-6` stays a float)."""
    written = yaml.safe_load(BASE_CONFIG.read_text())
    loaded = load_config(BASE_CONFIG).to_dict()  # also refuses a base_256.yaml the driver would

    def keep(raw: dict[str, Any], resolved: dict[str, Any]) -> dict[str, Any]:
        return {k: keep(v, resolved[k]) if isinstance(v, dict) else resolved[k] for k, v in raw.items()}

    return {k: v for k, v in keep(written, loaded).items() if k not in CHART_OWNED}


def _section_comment(name: str, indent: str) -> list[str]:
    cls = typing.get_type_hints(Config)[name]
    doc = " ".join((cls.__doc__ or "").split())
    return textwrap.wrap(f"-- {doc}", width=96, initial_indent=f"{indent}# ", subsequent_indent=f"{indent}# ")


def _yaml_scalar_or_list(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 16)
    return text.removesuffix("\n...\n").strip()


def _yaml_block(node: dict[str, Any], indent: str) -> list[str]:
    """Block mappings, flow lists: the way pipelines/configs/*.yaml are written."""
    lines = []
    for key, value in node.items():
        if isinstance(value, dict) and value:
            lines += [f"{indent}{key}:", *_yaml_block(value, indent + "  ")]
        else:
            lines.append(f"{indent}{key}: {_yaml_scalar_or_list(value)}")
    return lines


def generated_values(values_text: str) -> str:
    lines = values_text.splitlines()
    begin, end = _marker_lines(lines, VALUES_BEGIN, VALUES_END, VALUES_PATH)
    indent = lines[begin][: len(lines[begin]) - len(lines[begin].lstrip())]
    block = []
    for name, section in base_run_config().items():
        block += _section_comment(name, indent) + _yaml_block({name: section}, indent)
    return "\n".join([*lines[: begin + 1], *block, *lines[end:]]) + "\n"


def _marker_lines(lines: list[str], begin: str, end: str, path: Path) -> tuple[int, int]:
    found = [i for i, line in enumerate(lines) if line.strip() in (begin, end)]
    if len(found) != 2 or lines[found[0]].strip() != begin:
        raise SystemExit(f"{path}: expected one pair of lines\n  {begin}\n  {end}")
    return found[0], found[1]


# --------------------------------------------------------------------------- README table


def documented_keys(values_text: str) -> list[tuple[tuple[str, ...], str]]:
    """(key path, description) of every key right below a `# --` comment block."""
    out = []
    stack: list[tuple[int, str]] = []
    comment: list[str] | None = None
    for line in values_text.splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            comment = [stripped.removeprefix("# --").strip()]
        elif stripped.startswith("#"):
            if comment is not None:
                comment.append(stripped.removeprefix("#").strip())
        elif m := re.match(r"^( *)([A-Za-z_][\w.-]*):", line):
            indent = len(m.group(1))
            stack = [(d, k) for d, k in stack if d < indent] + [(indent, m.group(2))]
            if comment is not None:
                out.append((tuple(k for _, k in stack), " ".join(comment)))
            comment = None
        else:
            comment = None
    return out


def _schema_node(schema: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    node = schema
    for part in path:
        node = _resolve(schema, node).get("properties", {}).get(part, {})
    return _resolve(schema, node)


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref", "")
    return schema["definitions"][ref.rsplit("/", 1)[1]] if ref.startswith("#/definitions/") else node


_JSON_TYPES = {"integer": "int", "number": "float", "boolean": "bool", "string": "string",
               "array": "list", "object": "object", "null": "null"}


def _type(value: Any, node: dict[str, Any]) -> str:
    declared = node.get("type")
    if declared:
        return " or ".join(_JSON_TYPES[t] for t in ([declared] if isinstance(declared, str) else declared))
    if "enum" in node:
        return "string"
    for pytype, name in ((bool, "bool"), (int, "int"), (float, "float"), (str, "string"), (list, "list"), (dict, "object")):
        if isinstance(value, pytype):
            return name
    return "null"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def values_table(values_text: str, schema: dict[str, Any]) -> list[str]:
    values = yaml.safe_load(values_text)
    keys = documented_keys(values_text)
    sections = {path[:-1] for path, _ in keys}  # documented keys with documented keys below
    generated = {("runConfig", name) for name in base_run_config()}
    rows = ["| Key | Type | Default | Description |", "|-----|------|---------|-------------|"]
    for path, description in keys:
        value = values
        for part in path:
            value = value[part]
        if path in generated:
            default = BASE_CONFIG_LINK
            description += f" Keys: [docs/CONFIG.md]({CONFIG_DOC}#{path[1]})."
        elif path in sections:
            default = "(the keys below)"
        else:
            default = f"`{json.dumps(value, separators=(',', ':'))}`"
        rows.append(f"| `{'.'.join(path)}` | {_type(value, _schema_node(schema, path))} | "
                    f"{_cell(default)} | {_cell(description)} |")
    return rows


def generated_readme(readme_text: str, values_text: str, schema_text: str) -> str:
    lines = readme_text.splitlines()
    begin, end = _marker_lines(lines, README_BEGIN, README_END, README_PATH)
    table = values_table(values_text, json.loads(schema_text))
    return "\n".join([*lines[: begin + 1], *table, *lines[end:]]) + "\n"


# --------------------------------------------------------------------------- main


def generate() -> dict[Path, str]:
    """Path -> its content after generation (values first: the table documents them)."""
    values = generated_values(VALUES_PATH.read_text())
    schema = generated_schema(SCHEMA_PATH.read_text())
    readme = generated_readme(README_PATH.read_text(), values, schema)
    return {VALUES_PATH: values, SCHEMA_PATH: schema, README_PATH: readme}


def stale_files() -> list[Path]:
    return [path for path, text in generate().items() if path.read_text() != text]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a generated part is stale")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        for path in stale:
            print(f"stale: {path.relative_to(REPO)} (run `{REGENERATE}`)", file=sys.stderr)
        return 1 if stale else 0
    for path, text in generate().items():
        if path.read_text() != text:
            path.write_text(text)
            print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
