"""Generate the configuration reference (docs/CONFIG.md) from the config classes.

The reference is built from the dataclasses themselves — field names, types, defaults
and the inline comment on each field — so it cannot drift from the code; a test checks
that the committed file equals a fresh render.

    python -m trip.config_doc > docs/CONFIG.md
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing

from trip import config as C

_FIELD = re.compile(r"^\s+(\w+):\s*[^=]+?(?:=.*?)?(?:#\s*(.*))?$")


def field_comments(cls: type) -> dict[str, str]:
    """Field name -> the inline `# comment` after it in the class source."""
    out = {}
    for line in inspect.getsource(cls).splitlines():
        m = _FIELD.match(line)
        if m and m.group(2):
            out[m.group(1)] = m.group(2).strip()
    return out


def _type(tp: typing.Any) -> str:
    return str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "").replace("|", "\\|")


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        v = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        v = f.default_factory()  # type: ignore[misc]
        if dataclasses.is_dataclass(v):
            return "(section)"
    else:
        return "required"
    return f"`{list(v) if isinstance(v, tuple) else v!r}`"


def _section(cls: type, prefix: str, lines: list[str]) -> None:
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    doc = (cls.__doc__ or "").strip().splitlines()
    lines += [f"## `{prefix}`", "", " ".join(d.strip() for d in doc), "",
              "| key | type | default | meaning |", "|---|---|---|---|"]
    nested = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            nested.append((tp, f"{prefix}.{f.name}"))
            lines.append(f"| `{f.name}` | section | | see `{prefix}.{f.name}` |")
            continue
        lines.append(f"| `{f.name}` | `{_type(tp)}` | {_default(f)} | {comments.get(f.name, '')} |")
    lines.append("")
    for tp, name in nested:
        _section(tp, name, lines)


def render() -> str:
    lines = ["# Configuration reference", "",
             "Generated from `trip/config.py` by `python -m trip.config_doc`; do not edit by hand.",
             "A run config is one YAML file with these sections; unknown keys and wrong types are",
             "errors naming the key and file. Override any value with `--set section.key=value`.", ""]
    hints = typing.get_type_hints(C.Config)
    for f in dataclasses.fields(C.Config):
        _section(hints[f.name], f.name, lines)
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    print(render(), end="")
