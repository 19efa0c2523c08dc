"""docs/CONFIG.md is generated from the config classes and must match them."""

from pathlib import Path

from trip.config_doc import render

DOC = Path(__file__).resolve().parents[2] / "docs" / "CONFIG.md"


def test_committed_config_reference_matches_the_config_classes():
    assert DOC.read_text() == render(), "docs/CONFIG.md is stale: run `python -m trip.config_doc > docs/CONFIG.md`"


def test_every_field_of_every_section_is_documented_with_a_comment():
    undocumented = [line for line in render().splitlines()
                    if line.startswith("| `") and line.rstrip().endswith("|  |")]
    assert not undocumented, undocumented
