"""response_format -> GBNF with no process: bounded integers are enforced as enums."""

from __future__ import annotations

import pytest

from rbee.worker.grammar import MAX_INTEGER_ENUM, bounded_integers_as_enums, json_schema_grammar


def test_a_small_bounded_integer_becomes_the_enum_of_its_values() -> None:
    schema = {"type": "object", "properties": {
        "n": {"type": "integer", "minimum": 1, "maximum": 5, "description": "kept"},
        "m": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 3},
        "items": {"type": "array", "items": {"type": "integer", "minimum": -1, "maximum": 1}},
    }}
    out = bounded_integers_as_enums(schema)["properties"]
    assert out["n"] == {"description": "kept", "enum": [1, 2, 3, 4, 5]}
    assert out["m"] == {"enum": [1, 2]}
    assert out["items"]["items"] == {"enum": [-1, 0, 1]}
    grammar = json_schema_grammar(schema)
    assert '"1" | "2" | "3" | "4" | "5"' in grammar


@pytest.mark.parametrize("integer", [
    {"type": "integer", "minimum": 0},                               # one bound only
    {"type": "integer", "minimum": 0, "maximum": MAX_INTEGER_ENUM},  # too many values
    {"type": "integer", "minimum": 0.5, "maximum": 3},               # not whole bounds
    {"type": "integer", "minimum": 5, "maximum": 1},                 # empty: the converter's business
    {"type": "number", "minimum": 0, "maximum": 3},                  # not an integer
])
def test_other_numbers_are_left_to_the_converter(integer: dict) -> None:
    assert bounded_integers_as_enums(integer) == integer
