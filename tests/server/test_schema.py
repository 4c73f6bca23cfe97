"""The JSON Schema subset used for request bodies."""

from __future__ import annotations

from typing import Any

import pytest

from engine.errors import ConfigError
from engine.server.schema import MAX_PROBLEMS, check_schema, validate

TASK = {
    "type": "object",
    "required": ["name", "targets"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z]+$", "maxLength": 8},
        "targets": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3},
        "timeout": {"type": "number", "exclusiveMinimum": 0},
        "min_responses": {"type": "integer", "minimum": 0},
        "order": {"enum": ["ANY", "SEQUENTIAL"]},
        "props": {"type": "object", "additionalProperties": {"type": ["string", "null"]}, "maxProperties": 2},
        "version": {"const": 1},
        "data": {"anyOf": [{"type": "null"}, {"type": "object"}]},
    },
}


def problems(value: Any) -> list[tuple[str, str]]:
    return [(p.path, p.message) for p in validate(TASK, value)]


def test_a_conforming_value_has_no_problems() -> None:
    assert problems({"name": "train", "targets": ["site-1"], "timeout": 1.5, "min_responses": 2,
                     "order": "ANY", "props": {"a": "x", "b": None}, "version": 1, "data": None}) == []
    # stricter than JSON Schema: 3.0 is a number, not an integer (handlers get ints)
    assert problems({"name": "x", "targets": ["a"], "min_responses": 3.0}) == [
        ("$.min_responses", "expected integer, got number")]


@pytest.mark.parametrize(("value", "expected"), [
    ({"targets": []}, [("$.name", "is required"), ("$.targets", "must hold at least 1 item(s)")]),
    ({"name": "Train", "targets": ["a"]}, [("$.name", "must match the pattern '^[a-z]+$'")]),
    ({"name": "abcdefghi", "targets": ["a"]}, [("$.name", "must be at most 8 characters long")]),
    ({"name": "a", "targets": ["a", 1]}, [("$.targets[1]", "expected string, got integer")]),
    ({"name": "a", "targets": ["a"] * 4}, [("$.targets", "must hold at most 3 item(s)")]),
    ({"name": "a", "targets": ["a"], "timeout": 0}, [("$.timeout", "must be > 0")]),
    ({"name": "a", "targets": ["a"], "min_responses": True}, [("$.min_responses", "expected integer, got boolean")]),
    ({"name": "a", "targets": ["a"], "min_responses": 1.5}, [("$.min_responses", "expected integer, got number")]),
    ({"name": "a", "targets": ["a"], "min_responses": -1}, [("$.min_responses", "must be >= 0")]),
    ({"name": "a", "targets": ["a"], "order": "RANDOM"}, [("$.order", "must be one of 'ANY', 'SEQUENTIAL'")]),
    ({"name": "a", "targets": ["a"], "props": {"a": 1}}, [("$.props.a", "expected string or null, got integer")]),
    ({"name": "a", "targets": ["a"], "props": {"a": "", "b": "", "c": ""}},
     [("$.props", "must hold at most 2 field(s)")]),
    ({"name": "a", "targets": ["a"], "version": 2}, [("$.version", "must be 1")]),
    ({"name": "a", "targets": ["a"], "data": []}, [("$.data", "matches none of the allowed forms")]),
    ({"name": "a", "targets": ["a"], "extra": 1}, [("$.extra", "is not an allowed field")]),
    ([], [("$", "expected object, got array")]),
])
def test_each_problem_is_reported_with_its_path(value: Any, expected: list[tuple[str, str]]) -> None:
    assert problems(value) == expected


def test_problem_count_is_capped() -> None:
    schema = {"type": "array", "items": {"type": "integer"}}
    assert len(validate(schema, ["x"] * 1000)) == MAX_PROBLEMS


@pytest.mark.parametrize(("schema", "message"), [
    ({"type": "object", "oneOf": []}, "unsupported keyword"),
    ({"type": "strin"}, "unknown type"),
    ({"properties": {"a": {"$ref": "#/x"}}}, r"\$\.a uses unsupported"),
    ({"items": {"type": "object", "patternProperties": {}}}, "patternProperties"),
    ({"pattern": "("}, "bad pattern"),
    ({"additionalProperties": {"format": "x", "minimum": 1, "if": {}}}, "if"),
    ("object", "must be an object"),
])
def test_schemas_using_unenforced_keywords_are_refused(schema: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_schema(schema)


def test_annotations_are_allowed() -> None:
    check_schema({"type": "string", "description": "d", "title": "t", "examples": ["x"], "default": "x",
                  "format": "uuid", "deprecated": False})
