"""Table, CSV and JSON output of rows whose values come from either dialect's driver."""

from __future__ import annotations

import csv
import io
import json
import uuid
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any, TextIO

import pytest

from engine.errors import ConfigError
from engine.history.render import (
    cell_text,
    json_value,
    write_csv,
    write_json,
    write_rows,
    write_table,
)


def render(
    fn: Callable[[Sequence[str], Iterable[Sequence[Any]], TextIO], int],
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
) -> str:
    out = io.StringIO()
    fn(columns, rows, out)
    return out.getvalue()


def test_table_aligns_and_right_aligns_numbers() -> None:
    text = render(write_table, ["machine", "n", "note"], [("a", 5, None), ("longer-id", 12345, "x\ny"), ("b", None, "ok")])
    assert text == (
        "machine        n  note\n"
        "---------  -----  ----\n"
        "a              5\n"
        "longer-id  12345  x\\ny\n"
        "b                 ok\n"
        "(3 rows)\n"
    )


def test_table_empty_and_single_row() -> None:
    assert render(write_table, ["a"], []) == "a\n-\n(0 rows)\n"
    assert render(write_table, ["a"], [(True,)]) == "a\n----\ntrue\n(1 row)\n"
    out = io.StringIO()
    write_table(["a"], [("x",)], out, footer=False)
    assert out.getvalue() == "a\n-\nx\n"


def test_csv_round_trips_awkward_text() -> None:
    rows = [("a,b", 'say "hi"', "two\nlines"), (None, 1.5, True)]
    text = render(write_csv, ["x", "y", "z"], rows)
    assert list(csv.reader(io.StringIO(text))) == [
        ["x", "y", "z"], ["a,b", 'say "hi"', "two\nlines"], ["", "1.5", "true"],
    ]


def test_json_is_a_list_of_objects() -> None:
    when = datetime(2026, 1, 2, 3, 4, 5, 250, tzinfo=UTC)
    rows = [(1, "a", None, True, {"k": [1, 2]}, Decimal("10"), when, b"\x01\xff")]
    text = render(write_json, ["id", "s", "n", "b", "data", "total", "at", "raw"], rows)
    assert json.loads(text) == [{
        "id": 1, "s": "a", "n": None, "b": True, "data": {"k": [1, 2]}, "total": 10,
        "at": "2026-01-02T03:04:05.000250+00:00", "raw": "\\x01ff",
    }]
    assert render(write_json, ["a"], []) == "[]\n"


def test_json_keeps_duplicate_columns() -> None:
    assert json.loads(render(write_json, ["a", "a", "a"], [(1, 2, 3)])) == [{"a": 1, "a_2": 2, "a_3": 3}]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (Decimal("1.5"), 1.5),
        (Decimal("-7"), -7),
        (Decimal("1E+3"), 1000),
        (Decimal("0.1000000000000000055511151231257827"), "0.1000000000000000055511151231257827"),
        (float("nan"), "NaN"),
        (float("-inf"), "-Infinity"),
        (Decimal("Infinity"), "Infinity"),
        (date(2026, 1, 2), "2026-01-02"),
        (timedelta(seconds=90), 90.0),
        (uuid.UUID(int=1), "00000000-0000-0000-0000-000000000001"),
        (memoryview(b"ab"), "\\x6162"),
        ((1, Decimal("2.5")), [1, 2.5]),
    ],
)
def test_json_values(value: object, expected: object) -> None:
    assert json_value(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, ""),
        (False, "false"),
        (0.1, "0.1"),
        (Decimal("1E+3"), "1000"),
        (Decimal("0.000001"), "0.000001"),
        ({"b": 1, "a": None}, '{"b":1,"a":null}'),
        (datetime(2026, 1, 2, tzinfo=UTC), "2026-01-02T00:00:00+00:00"),
        (bytearray(b"\x00"), "\\x00"),
    ],
)
def test_cell_text(value: object, expected: str) -> None:
    assert cell_text(value) == expected


def test_unknown_format() -> None:
    with pytest.raises(ConfigError, match="unknown output format 'xml'; choose one of: table, csv, json"):
        write_rows("xml", ["a"], [], io.StringIO())
