"""A small JSON Schema subset: the request bodies of routes are checked against it.

Route specs carry their request and response schemas as plain dicts (they are also
published in the OpenAPI document). Only the keywords listed in ``_ASSERTIONS`` are
enforced; ``check_schema`` refuses any other keyword at route registration, so a
schema can never *look* stricter than what is actually checked. Annotations
(``description``, ``title``, ``examples``, ``default``, ``format``, ``deprecated``)
are allowed and ignored.

``validate`` reports every problem it finds, each with a JSON path (``$.targets[2]``),
so a 422 answer tells the caller all that is wrong at once.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from engine.errors import ConfigError

__all__ = ["FieldProblem", "check_schema", "validate"]

_ASSERTIONS = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "enum", "const",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength",
    "pattern", "minItems", "maxItems", "maxProperties", "anyOf",
})
_ANNOTATIONS = frozenset({"description", "title", "examples", "default", "format", "deprecated"})
_TYPES = frozenset({"object", "array", "string", "integer", "number", "boolean", "null"})
#: at most this many problems are reported (a hostile body must not produce a huge answer)
MAX_PROBLEMS = 50


@dataclass(frozen=True, slots=True)
class FieldProblem:
    """One way a JSON value breaks its schema."""

    path: str
    message: str

    def as_dict(self) -> dict[str, str]:
        """The problem as it appears in a 422 error body."""
        return {"path": self.path, "message": self.message}


def check_schema(schema: Mapping[str, Any], where: str = "$") -> None:
    """Refuse a schema that uses keywords this validator does not enforce.

    Args:
        schema: the schema (a plain dict).
        where: where it sits, for the error message.

    Raises:
        ConfigError: an unknown keyword, an unknown type name or a malformed sub-schema.
    """
    if not isinstance(schema, Mapping):
        raise ConfigError(f"schema at {where} must be an object, not {type(schema).__name__}")
    unknown = set(schema) - _ASSERTIONS - _ANNOTATIONS
    if unknown:
        raise ConfigError(
            f"schema at {where} uses unsupported keyword(s) {', '.join(sorted(unknown))}; "
            f"supported: {', '.join(sorted(_ASSERTIONS))}"
        )
    kinds = schema.get("type")
    names = [kinds] if isinstance(kinds, str) else list(kinds or [])
    bad = [n for n in names if n not in _TYPES]
    if bad:
        raise ConfigError(f"schema at {where} names unknown type(s) {bad}")
    for name, sub in (schema.get("properties") or {}).items():
        check_schema(sub, f"{where}.{name}")
    extra = schema.get("additionalProperties")
    if isinstance(extra, Mapping):
        check_schema(extra, f"{where}.*")
    if "items" in schema:
        check_schema(schema["items"], f"{where}[]")
    for i, option in enumerate(schema.get("anyOf") or []):
        check_schema(option, f"{where}<anyOf {i}>")
    if "pattern" in schema:
        try:
            re.compile(schema["pattern"])
        except re.error as exc:
            raise ConfigError(f"schema at {where}: bad pattern {schema['pattern']!r}: {exc}") from None


def validate(schema: Mapping[str, Any], value: Any) -> list[FieldProblem]:
    """Return every way ``value`` breaks ``schema`` (empty when it conforms)."""
    problems: list[FieldProblem] = []
    _check(schema, value, "$", problems)
    return problems[:MAX_PROBLEMS]


def _type_of(value: Any) -> str:
    # bool is an int subclass in Python; JSON keeps them apart
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _matches_type(value: Any, name: str) -> bool:
    actual = _type_of(value)
    if name == "number":
        return actual in ("integer", "number")
    # stricter than JSON Schema on purpose: 3.0 is not an integer here, so a handler
    # given an "integer" field always gets a Python int
    return actual == name


def _check(schema: Mapping[str, Any], value: Any, path: str, out: list[FieldProblem]) -> None:
    if len(out) >= MAX_PROBLEMS:
        return
    kinds = schema.get("type")
    if kinds is not None:
        names = [kinds] if isinstance(kinds, str) else list(kinds)
        if not any(_matches_type(value, n) for n in names):
            out.append(FieldProblem(path, f"expected {' or '.join(names)}, got {_type_of(value)}"))
            return
    if "const" in schema and value != schema["const"]:
        out.append(FieldProblem(path, f"must be {schema['const']!r}"))
    if "enum" in schema and value not in schema["enum"]:
        choices = ", ".join(repr(c) for c in schema["enum"])
        out.append(FieldProblem(path, f"must be one of {choices}"))
    if "anyOf" in schema and all(validate(option, value) for option in schema["anyOf"]):
        out.append(FieldProblem(path, "matches none of the allowed forms"))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        _check_number(schema, value, path, out)
    elif isinstance(value, str):
        _check_string(schema, value, path, out)
    elif isinstance(value, list):
        _check_array(schema, value, path, out)
    elif isinstance(value, dict):
        _check_object(schema, value, path, out)


def _check_number(schema: Mapping[str, Any], value: float, path: str, out: list[FieldProblem]) -> None:
    if "minimum" in schema and value < schema["minimum"]:
        out.append(FieldProblem(path, f"must be >= {schema['minimum']}"))
    if "maximum" in schema and value > schema["maximum"]:
        out.append(FieldProblem(path, f"must be <= {schema['maximum']}"))
    if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
        out.append(FieldProblem(path, f"must be > {schema['exclusiveMinimum']}"))
    if "exclusiveMaximum" in schema and value >= schema["exclusiveMaximum"]:
        out.append(FieldProblem(path, f"must be < {schema['exclusiveMaximum']}"))


def _check_string(schema: Mapping[str, Any], value: str, path: str, out: list[FieldProblem]) -> None:
    if "minLength" in schema and len(value) < schema["minLength"]:
        out.append(FieldProblem(path, f"must be at least {schema['minLength']} characters long"))
    if "maxLength" in schema and len(value) > schema["maxLength"]:
        out.append(FieldProblem(path, f"must be at most {schema['maxLength']} characters long"))
    if "pattern" in schema and re.search(schema["pattern"], value) is None:
        out.append(FieldProblem(path, f"must match the pattern {schema['pattern']!r}"))


def _check_array(schema: Mapping[str, Any], value: list[Any], path: str, out: list[FieldProblem]) -> None:
    if "minItems" in schema and len(value) < schema["minItems"]:
        out.append(FieldProblem(path, f"must hold at least {schema['minItems']} item(s)"))
    if "maxItems" in schema and len(value) > schema["maxItems"]:
        out.append(FieldProblem(path, f"must hold at most {schema['maxItems']} item(s)"))
        return
    items = schema.get("items")
    if items is not None:
        for i, item in enumerate(value):
            _check(items, item, f"{path}[{i}]", out)


def _check_object(
    schema: Mapping[str, Any], value: dict[str, Any], path: str, out: list[FieldProblem]
) -> None:
    if "maxProperties" in schema and len(value) > schema["maxProperties"]:
        out.append(FieldProblem(path, f"must hold at most {schema['maxProperties']} field(s)"))
        return
    props: Mapping[str, Any] = schema.get("properties") or {}
    for name in schema.get("required") or ():
        if name not in value:
            out.append(FieldProblem(f"{path}.{name}", "is required"))
    extra = schema.get("additionalProperties", True)
    for name, item in value.items():
        if name in props:
            _check(props[name], item, f"{path}.{name}", out)
        elif extra is False:
            out.append(FieldProblem(f"{path}.{name}", "is not an allowed field"))
        elif isinstance(extra, Mapping):
            _check(extra, item, f"{path}.{name}", out)
