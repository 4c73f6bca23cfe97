"""Print rows for people (an aligned table) and for programs (CSV, JSON).

Values come from two dialects and their drivers, so they are normalised here:
SQL NULL is an empty cell (``null`` in JSON), booleans are ``true``/``false``,
times are ISO 8601, bytes are ``\\x``-prefixed hex (as PostgreSQL prints ``bytea``),
decimals keep every digit, and JSON values (PostgreSQL hands back objects) are
compact JSON text in a cell and nested JSON in JSON output.
"""

from __future__ import annotations

import csv
import json
import math
import uuid
from collections.abc import Iterable, Sequence
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any, TextIO

from engine.clock import format_us
from engine.errors import ConfigError
from engine.machines.state import MachineState

__all__ = ["FORMATS", "STATE_COLUMNS", "cell_text", "state_row", "json_value", "write_csv", "write_json", "write_rows", "write_table"]

#: output formats of ``write_rows``
FORMATS = ("table", "csv", "json")

_ESCAPES = str.maketrans({"\n": "\\n", "\r": "\\r", "\t": "\\t"})


def _bytes_text(value: bytes | bytearray | memoryview) -> str:
    return "\\x" + bytes(value).hex()


def json_value(value: Any) -> Any:
    """``value`` as plain JSON data (str, int, float, bool, None, lists, dicts)."""
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, Decimal):
        if not value.is_finite():
            return json_value(float(value))
        if value == value.to_integral_value():
            return int(value)
        as_float = float(value)
        # a number when the float says exactly the same, else the exact digits as text
        return as_float if Decimal(repr(as_float)) == value else str(value)
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, bytes | bytearray | memoryview):
        return _bytes_text(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_value(v) for v in value]
    return str(value)


def cell_text(value: Any) -> str:
    """``value`` as the text of one table or CSV cell (NULL is empty)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, Decimal):
        return format(value, "f") if value.is_finite() else str(value)
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, bytes | bytearray | memoryview):
        return _bytes_text(value)
    if isinstance(value, dict | list | tuple):
        return json.dumps(json_value(value), ensure_ascii=False, separators=(",", ":"))
    return str(value)


def _unique(columns: Sequence[str]) -> list[str]:
    """Column names made unique (``id``, ``id_2``, ...) so JSON objects keep every column."""
    seen: dict[str, int] = {}
    out: list[str] = []
    for name in columns:
        count = seen.get(name, 0) + 1
        seen[name] = count
        out.append(name if count == 1 else f"{name}_{count}")
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | Decimal) and not isinstance(value, bool)


def write_table(
    columns: Sequence[str], rows: Iterable[Sequence[Any]], out: TextIO, *, footer: bool = True
) -> int:
    """Write an aligned table (header, rule, rows; numbers right-aligned); return the row count.

    Every row is read before the first line is written: the widths depend on all of them.
    """
    texts: list[list[str]] = []
    numeric = [True] * len(columns)
    seen_value = [False] * len(columns)
    for row in rows:
        line = []
        for i, value in enumerate(row):
            if value is not None:
                seen_value[i] = True
                if not _is_number(value):
                    numeric[i] = False
            line.append(cell_text(value).translate(_ESCAPES))
        texts.append(line)
    right = [n and s for n, s in zip(numeric, seen_value, strict=True)]
    widths = [len(name) for name in columns]
    for line in texts:
        for i, cell in enumerate(line):
            widths[i] = max(widths[i], len(cell))

    def fmt(cells: Sequence[str]) -> str:
        parts = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right, strict=True)]
        return "  ".join(parts).rstrip()

    out.write(fmt(columns) + "\n")
    out.write("  ".join("-" * w for w in widths) + "\n")
    for line in texts:
        out.write(fmt(line) + "\n")
    if footer:
        out.write(f"({len(texts)} row{'' if len(texts) == 1 else 's'})\n")
    return len(texts)


def write_csv(columns: Sequence[str], rows: Iterable[Sequence[Any]], out: TextIO) -> int:
    """Write RFC 4180 CSV with a header line; return the row count."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    count = 0
    for row in rows:
        writer.writerow([cell_text(v) for v in row])
        count += 1
    return count


def write_json(columns: Sequence[str], rows: Iterable[Sequence[Any]], out: TextIO) -> int:
    """Write a JSON list with one object per row (one row per line); return the row count."""
    keys = _unique(columns)
    count = 0
    for row in rows:
        obj = {k: json_value(v) for k, v in zip(keys, row, strict=True)}
        out.write(("[\n  " if count == 0 else ",\n  ") + json.dumps(obj, ensure_ascii=False, allow_nan=False))
        count += 1
    out.write("[]\n" if count == 0 else "\n]\n")
    return count


#: columns of a table of machine states (``fedlog replay``)
STATE_COLUMNS = ("machine", "kind", "state", "version", "terminal", "deadline", "job", "round", "site")


def state_row(state: MachineState) -> tuple[Any, ...]:
    """One machine state as a row of ``STATE_COLUMNS`` (deadline as ISO 8601 UTC)."""
    return (
        state.machine_id, state.kind, state.state, state.version, state.terminal,
        format_us(state.deadline_us) if state.deadline_us is not None else None,
        state.job_id, state.round, state.site,
    )


def write_rows(fmt: str, columns: Sequence[str], rows: Iterable[Sequence[Any]], out: TextIO) -> int:
    """Write ``rows`` in format ``fmt`` (one of ``FORMATS``); return the row count."""
    if fmt == "table":
        return write_table(columns, rows, out)
    if fmt == "csv":
        return write_csv(columns, rows, out)
    if fmt == "json":
        return write_json(columns, rows, out)
    raise ConfigError(f"unknown output format {fmt!r}; choose one of: {', '.join(FORMATS)}")
