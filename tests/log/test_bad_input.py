"""Bad database locations: a precise ``ConfigError`` before any connection is tried,
and a ``StoreError`` naming the database (not a driver traceback) when it cannot be
reached or is not a database at all."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from engine.errors import ConfigError, StoreError
from engine.log import migrate
from engine.log import sql as sql_module
from engine.log.sql import open_recorder
from engine.log.target import describe, to_url


@pytest.fixture
def no_connections(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything tries to build an engine or connect."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"a connection was attempted: {args} {kwargs}")

    monkeypatch.setattr(sql_module, "create_engine", refuse)
    monkeypatch.setattr(migrate, "create_engine", refuse)
    monkeypatch.setattr("sqlite3.connect", refuse)
    monkeypatch.setattr("psycopg.connect", refuse)


GARBAGE = [
    ("foo://x", "unsupported database 'foo'"),
    ("mysql://u@h/db", "unsupported database 'mysql'"),
    ("postgres://u@h/db", "unsupported database 'postgres'"),
    ("postgresql://", "names no database; use postgresql://USER@HOST[:PORT]/DB"),
    ("postgresql://user@host", "names no database"),
    ("postgresql://u@h:notaport/db", "not a database URL: 'postgresql://u@h:notaport/db'"),
    ("://nothing", "not a database URL"),
    ("", "empty database location"),
    ("   ", "empty database location"),
]


@pytest.mark.usefixtures("no_connections")
@pytest.mark.parametrize(("target", "fragment"), GARBAGE, ids=[g[0] or "empty" for g in GARBAGE])
def test_garbage_url_is_a_config_error(target: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        to_url(target)
    assert fragment in str(info.value)
    with pytest.raises(ConfigError) as again:
        open_recorder(target)
    assert str(again.value) == str(info.value)


@pytest.mark.usefixtures("no_connections")
def test_directory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        open_recorder(str(tmp_path))
    assert str(info.value) == (
        f"database path {str(tmp_path)!r} is a directory; give a file such as {tmp_path}/fedlog.db"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.usefixtures("no_connections")
@pytest.mark.parametrize("as_url", [False, True], ids=["path", "sqlite-url"])
def test_path_in_a_missing_directory_is_a_config_error(tmp_path: Path, as_url: bool) -> None:
    missing = tmp_path / "no" / "such" / "dir"
    target = f"sqlite:///{missing}/log.db" if as_url else str(missing / "log.db")
    with pytest.raises(ConfigError) as info:
        open_recorder(target)
    assert str(info.value) == f"cannot use the database {missing}/log.db: directory {missing} does not exist"
    assert list(tmp_path.iterdir()) == []


def test_in_memory_sqlite_url_is_refused_for_a_log() -> None:
    with pytest.raises(ConfigError, match="in-memory SQLite database cannot be shared"):
        open_recorder("sqlite://")


def _closed_port() -> int:
    """A local TCP port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_postgresql_is_a_store_error() -> None:
    port = _closed_port()
    url = f"postgresql://fedlog:secret@127.0.0.1:{port}/fedlog"
    with pytest.raises(StoreError) as info:
        open_recorder(url)
    message = str(info.value)
    assert message.startswith(f"cannot use the database postgresql://fedlog:***@127.0.0.1:{port}/fedlog: ")
    assert f"port {port} failed" in message and "refused" in message.lower()
    assert "secret" not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__
    with pytest.raises(StoreError, match=f"port {port} failed"):
        migrate.upgrade(url)


def test_missing_postgresql_database_is_a_store_error(pg_url: str) -> None:
    url = to_url(pg_url).set(database="fedlog_no_such_db")
    with pytest.raises(StoreError) as info:
        open_recorder(url)
    assert str(info.value).startswith(f"cannot use the database {describe(url)}: ")
    assert 'database "fedlog_no_such_db" does not exist' in str(info.value)


@pytest.mark.parametrize("content", [b"\x00garbage\xff" * 600, b"hello, not a database\n" * 300])
def test_file_that_is_not_a_database_is_a_store_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "notes.db"
    path.write_bytes(content)
    with pytest.raises(StoreError) as info:
        open_recorder(str(path))
    assert str(info.value) == f"cannot use the database {path}: file is not a database"
    assert path.read_bytes() == content
