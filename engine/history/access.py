"""Open an existing log for reading: never create a database, never take the writer lease.

``fedlog replay`` and ``fedlog sql`` look at a log someone else writes (or wrote).
Opening a SQLite path that does not exist must not leave an empty new file behind,
and reading must not upgrade a schema behind the writer's back: an older schema is a
``SchemaError`` naming the command to run.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, event, pool
from sqlalchemy.engine import URL

from engine.errors import ConfigError, SchemaError
from engine.log import migrate
from engine.log.sql import SqlRecorder
from engine.log.target import describe, is_sqlite, sqlite_path, to_url

__all__ = ["existing_url", "open_log", "query_engine"]


def existing_url(target: str | Path | URL) -> URL:
    """The URL of ``target``, after checking that a SQLite file is there to read.

    Raises:
        ConfigError: a bad location, an in-memory SQLite URL, or no such database file.
    """
    url = to_url(target)
    if is_sqlite(url):
        path = sqlite_path(url)
        if path is None:
            raise ConfigError("an in-memory SQLite database has nothing to read; give the path of a log file")
        if not path.exists():
            raise ConfigError(f"no such database: {path} (nothing was created; check the path)")
        if not path.is_file():
            raise ConfigError(f"not a database file: {path}")
    return url


def open_log(target: str | Path | URL) -> SqlRecorder:
    """Open an existing event log for reading (no lease, no schema upgrade).

    Raises:
        ConfigError: no such database (see ``existing_url``).
        SchemaError: the database holds no fedlog log, or its schema is older or newer
            than this fedlog (the message names the command to run).
        StoreError: the database cannot be reached.
    """
    url = existing_url(target)
    status = migrate.status(url)
    if status.current is None:
        where = describe(url)
        raise SchemaError(
            f"{where} is not a fedlog event log (it has no fedlog schema); if it should be one, "
            f"run: fedlog db upgrade {where}"
        )
    return SqlRecorder(url, auto_upgrade=False)


def query_engine(target: str | Path | URL, *, read_only: bool = False) -> Engine:
    """An engine on an existing database for ad-hoc queries, with transactional DDL.

    SQLite files are opened with ``mode=rw`` so even a file removed since the check
    is never created again. The stdlib driver normally starts no transaction before
    DDL (a ``CREATE`` would commit at once); here every statement runs inside the
    transaction the caller begins, so rolling it back undoes everything.
    ``read_only``: the database itself refuses writes (SQLite ``query_only``,
    PostgreSQL ``READ ONLY`` transactions), whatever the statement looks like.
    """
    url = existing_url(target)
    if not is_sqlite(url):
        engine = create_engine(url, poolclass=pool.NullPool)
        if read_only:
            @event.listens_for(engine, "begin")
            def _read_only(conn: Connection) -> None:
                conn.exec_driver_sql("SET TRANSACTION READ ONLY")
        return engine
    path = sqlite_path(url)
    assert path is not None  # existing_url refused in-memory databases
    uri = path.resolve().as_uri() + "?mode=rw"

    def connect() -> sqlite3.Connection:
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout=10000")
        if read_only:
            conn.execute("PRAGMA query_only=1")
        return conn

    engine = create_engine("sqlite+pysqlite://", creator=connect, poolclass=pool.NullPool)

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN")

    return engine
