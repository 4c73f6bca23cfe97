"""``fedlog sql``: run one SQL statement on a log database and hand back its rows.

The statement goes to the driver as written (no bind-parameter parsing, so ``:x``
and ``%`` mean what they mean to the database), inside a transaction. Nothing is
committed unless the caller asks for ``write=True`` (the ``--write`` flag a later
issue adds); otherwise the transaction is rolled back, on SQLite too (see
``access.query_engine``). A failing statement is a ``StoreError`` carrying the
database's own message, never a driver traceback.

One statement is meant: SQLite refuses a string holding several; PostgreSQL's driver
runs them all (inside the same rolled-back transaction) and the first result is shown.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from engine.errors import ConfigError, StoreError
from engine.history.access import query_engine
from engine.log.target import describe, to_url

__all__ = ["QueryResult", "ReadOnlyRefused", "is_read_only", "list_views", "query", "run_query"]

#: statements that write, by their first keyword (anything else goes to a read-only database)
_WRITING = frozenset({"insert", "update", "delete", "create", "drop", "alter", "replace", "truncate", "grant",
                      "revoke", "vacuum", "reindex", "attach", "detach", "copy", "merge", "comment", "cluster",
                      "refresh", "analyze", "lock", "upsert", "rename"})


class ReadOnlyRefused(ConfigError):
    """A statement that would write, without ``write=True``; nothing was run."""


def is_read_only(sql: str) -> bool:
    """False when ``sql`` plainly writes, judged by its first keyword (the database enforces read-only besides)."""
    text = sql.strip()
    while text.startswith(("--", "/*")):  # leading comments
        if text.startswith("--"):
            text = text.partition("\n")[2].strip()
        else:
            text = text.partition("*/")[2].strip()
    words = text.split(None, 1)
    first = words[0].lower().rstrip(";") if words else ""
    if first == "pragma":
        return "=" not in text  # PRAGMA name reads; PRAGMA name = value writes
    return first not in _WRITING


@dataclass
class QueryResult:
    """The outcome of one statement: its columns and (lazily read) rows, or a row count."""

    #: column names, in order (empty for a statement that returns no rows)
    columns: list[str]
    #: the rows; read them inside the ``run_query`` block
    rows: Iterator[Sequence[Any]]
    #: rows affected, for statements that return no rows (None when unknown)
    rowcount: int | None
    #: whether the statement's effects were committed (only with ``write=True``)
    committed: bool

    @property
    def returns_rows(self) -> bool:
        """True for a statement that produced a result set (a SELECT, RETURNING, ...)."""
        return bool(self.columns)


class _Failure:
    """Turns driver and SQLAlchemy errors into a ``StoreError`` naming the database."""

    def __init__(self, where: str) -> None:
        self.where = where

    def error(self, exc: SQLAlchemyError, doing: str = "query failed on") -> StoreError:
        reason = exc.orig if isinstance(exc, DBAPIError) else exc
        text = str(reason).strip() or type(reason).__name__
        return StoreError(f"{doing} {self.where}: {text}")


@contextmanager
def run_query(target: str | Path | URL, sql: str, *, write: bool = False) -> Iterator[QueryResult]:
    """Run ``sql`` on the existing database ``target``; yield its result while it is open.

    Args:
        target: a SQLite path or a SQLAlchemy URL; a missing SQLite file is an error,
            never created.
        sql: one statement, sent to the database as written.
        write: commit the statement's effects; by default they are rolled back.

    Raises:
        ConfigError: an empty statement or an unusable location.
        StoreError: the database refused the statement or could not be reached.
    """
    if not sql.strip():
        raise ConfigError("empty query: give one SQL statement, e.g. \"SELECT * FROM machines\"")
    if not write and not is_read_only(sql):
        first = sql.strip().split(None, 1)[0].upper()
        raise ReadOnlyRefused(f"refused: this {first} statement would change the log, and fedlog sql reads only; "
                              "run it again with --write to commit it (nothing was run)")
    engine = query_engine(target, read_only=not write)
    failure = _Failure(describe(to_url(target)))
    try:
        try:
            conn = engine.connect()
        except SQLAlchemyError as exc:
            raise failure.error(exc, "cannot connect to") from None
        with conn:
            transaction = conn.begin()
            try:
                result = conn.execution_options(no_parameters=True).exec_driver_sql(sql)
            except SQLAlchemyError as exc:
                transaction.rollback()
                raise failure.error(exc) from None
            columns = list(result.keys()) if result.returns_rows else []
            rowcount = None if result.returns_rows or result.rowcount < 0 else result.rowcount
            yield QueryResult(columns, _rows(result, failure), rowcount, committed=write)
            if write:
                transaction.commit()
            else:
                transaction.rollback()
    finally:
        engine.dispose()


def _rows(result: Any, failure: _Failure) -> Iterator[Sequence[Any]]:
    if not result.returns_rows:
        return
    try:
        yield from result
    except SQLAlchemyError as exc:  # SQLite evaluates lazily: errors can surface mid-way
        raise failure.error(exc) from None


def query(target: str | Path | URL, sql: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Run ``sql`` and return (columns, all rows as tuples); nothing is committed."""
    with run_query(target, sql) as result:
        return result.columns, [tuple(row) for row in result.rows]


def list_views(target: str | Path | URL) -> list[tuple[str, list[str]]]:
    """The database's views and their columns (``fedlog sql --views``)."""
    from sqlalchemy import inspect

    engine = query_engine(target)
    failure = _Failure(describe(to_url(target)))
    try:
        inspector = inspect(engine)
        return [(name, [c["name"] for c in inspector.get_columns(name)]) for name in sorted(inspector.get_view_names())]
    except SQLAlchemyError as exc:
        raise failure.error(exc, "cannot read the views of") from None
    finally:
        engine.dispose()
