"""The run-config JSON schema says what the strict loader says, field by field."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import jsonschema
import pytest

from trip.config import ConfigError, config_from_dict, load_config
from trip.config_schema import run_config_schema, type_schema

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "pipelines" / "configs").glob("*.yaml"))
VALIDATOR = jsonschema.Draft7Validator(run_config_schema())


def schema_errors(data: dict[str, Any]) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in VALIDATOR.iter_errors(data)]


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_run_config_passes_the_schema(path: Path) -> None:
    import yaml

    assert not schema_errors(yaml.safe_load(path.read_text()))


def test_the_full_default_config_passes_the_schema() -> None:
    assert not schema_errors(load_config().to_dict())


@pytest.mark.parametrize(("data", "where"), [
    ({"train": {"max_stepz": 5}}, "train: Additional properties are not allowed ('max_stepz'"),
    ({"trainer": {}}, ": Additional properties are not allowed ('trainer'"),
    ({"model": {"unet": {"layers": 2}}}, "model/unet: Additional properties"),
    ({"train": {"max_steps": "many"}}, "train/max_steps: 'many' is not of type 'integer'"),
    ({"train": {"max_steps": 2.5}}, "train/max_steps: 2.5 is not of type 'integer'"),
    ({"train": {"precision": "fp16"}}, "train/precision: 'fp16' is not one of ['fp32', 'bf16']"),
    ({"data": {"pin_memory": "yes"}}, "data/pin_memory: 'yes' is not of type 'boolean'"),
    ({"train": {"betas": [0.9]}}, "train/betas: [0.9] is too short"),
    ({"model": {"unet": {"block_out_channels": [32, "64"]}}}, "model/unet/block_out_channels/1"),
])
def test_schema_and_loader_both_reject_the_same_mistake(data: dict[str, Any], where: str) -> None:
    assert any(e.startswith(where) for e in schema_errors(data)), schema_errors(data)
    with pytest.raises(ConfigError):
        config_from_dict(data)


@pytest.mark.parametrize("data", [
    {"train": {"lr_unet": 1}},  # an integer where a float is expected
    {"preprocess": {"fps": None, "frame_stride": 2}},  # Optional fields take null
    {"model": {"pretrained_unet": None}},
    {},  # every field has a default: nothing is required
])
def test_schema_accepts_what_the_loader_accepts(data: dict[str, Any]) -> None:
    assert not schema_errors(data)
    config_from_dict(data)


def test_annotations_map_to_closed_json_types() -> None:
    assert type_schema(Literal["a", "b"] | None) == {"enum": ["a", "b", None]}
    assert type_schema(list[int]) == {"type": "array", "items": {"type": "integer"}}
    assert type_schema(dict[str, float]) == {"type": "object", "additionalProperties": {"type": "number"}}
    assert type_schema(int | str) == {"anyOf": [{"type": "integer"}, {"type": "string"}]}
    with pytest.raises(TypeError, match="no JSON schema"):
        type_schema(set[int])
