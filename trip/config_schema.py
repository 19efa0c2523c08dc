"""JSON schema (draft-07) of a run config, generated from the config dataclasses.

Why: the Helm chart checks its `runConfig` against this schema at `helm install` time, so a
misspelt key, a wrong type or an unknown choice fails on the laptop, with Helm naming the
key, instead of in the driver pod after the GPUs were provisioned. It states what the
strict loader (trip.config) checks field by field: closed objects, types, Literal choices
and required fields. Rules between fields (`__post_init__`) stay with the loader.

Numbers follow the loader: an `int` field is a JSON `integer`, a `float` field a `number`
(which accepts integers too, as the loader does); `X | None` also allows null.

    python -m trip.config_schema    # print the schema of a whole run config
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, Literal

from trip.config import Config
from trip.config_doc import field_comments

Schema = dict[str, Any]

_SCALARS: dict[Any, str] = {bool: "boolean", int: "integer", float: "number", str: "string"}


def object_schema(cls: type) -> Schema:
    """A closed object for a config dataclass: one property per field, nested sections inline."""
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    properties = {}
    for f in dataclasses.fields(cls):
        prop = type_schema(hints[f.name])
        if f.name in comments:
            prop["description"] = comments[f.name]
        properties[f.name] = prop
    schema: Schema = {"description": " ".join((cls.__doc__ or "").split()),
                      "type": "object", "additionalProperties": False, "properties": properties}
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if required:
        schema["required"] = required
    return schema


def type_schema(tp: Any) -> Schema:
    """The schema of one field annotation; raises TypeError for one the loader cannot read."""
    if dataclasses.is_dataclass(tp):
        return object_schema(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        options = [type_schema(a) for a in args if a is not type(None)]
        schema = options[0] if len(options) == 1 else {"anyOf": options}
        return _or_null(schema) if type(None) in args else schema
    if origin is Literal:
        return {"enum": list(args)}
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return {"type": "array", "items": type_schema(args[0])}
    if origin is tuple:
        return {"type": "array", "items": [type_schema(a) for a in args],
                "minItems": len(args), "maxItems": len(args)}
    if origin is list:
        return {"type": "array", "items": type_schema(args[0])}
    if origin is dict:
        return {"type": "object", "additionalProperties": type_schema(args[1])}
    if tp is Any:
        return {}
    if tp in _SCALARS:
        return {"type": _SCALARS[tp]}
    raise TypeError(f"no JSON schema for the config annotation {tp!r}")


def _or_null(schema: Schema) -> Schema:
    if "enum" in schema:
        return {**schema, "enum": [*schema["enum"], None]}
    if isinstance(schema.get("type"), str):
        return {**schema, "type": [schema["type"], "null"]}
    return {"anyOf": [schema, {"type": "null"}]}


def run_config_schema() -> Schema:
    """The schema of a whole run config (trip.config.Config), with its `$schema` line."""
    return {"$schema": "http://json-schema.org/draft-07/schema#", **object_schema(Config)}


if __name__ == "__main__":
    print(json.dumps(run_config_schema(), indent=2))
