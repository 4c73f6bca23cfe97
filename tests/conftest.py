"""Shared fixtures: recorders on every backend, fresh PostgreSQL databases, charts, clocks.

PostgreSQL tests read the server URL from ``FEDLOG_TEST_PG_URL`` (any database on the
server; each test gets a fresh database of its own that is dropped afterwards). When
the variable is unset they are skipped locally, but with ``CI=true`` a missing or
unreachable PostgreSQL fails the run: CI must never pass by skipping them.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.charts.loader import load_charts
from engine.charts.registry import ChartRegistry
from engine.clock import ManualClock

PG_ENV = "FEDLOG_TEST_PG_URL"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _pg_admin_url() -> str:
    url = os.environ.get(PG_ENV, "")
    if not url:
        message = f"PostgreSQL tests need {PG_ENV} (e.g. postgresql://postgres@127.0.0.1:5432/test)"
        if IN_CI:
            pytest.fail(f"{message}; in CI they must run, not skip")
        pytest.skip(message)
    return url


@contextlib.contextmanager
def fresh_pg_database() -> Iterator[str]:
    """A fresh, empty PostgreSQL database's URL, dropped afterwards (skip or, in CI, fail without one)."""
    import psycopg
    from sqlalchemy.engine import make_url

    admin = make_url(_pg_admin_url()).set(drivername="postgresql")
    name = f"fedlog_t_{uuid.uuid4().hex[:12]}"
    try:
        with psycopg.connect(admin.render_as_string(hide_password=False), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        if IN_CI:
            pytest.fail(f"PostgreSQL at {admin.render_as_string()} is unreachable: {exc}")
        pytest.skip(f"PostgreSQL unreachable: {exc}")
    try:
        yield admin.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin.render_as_string(hide_password=False), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_url() -> Iterator[str]:
    """URL of a fresh, empty PostgreSQL database, dropped after the test."""
    with fresh_pg_database() as url:
        yield url


@pytest.fixture
def sqlite_path(tmp_path: Path) -> str:
    """Path of a not-yet-existing SQLite database file."""
    return str(tmp_path / "fedlog.db")


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def backend_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A log location on each backend in turn ("memory" means MemoryRecorder)."""
    if request.param == "memory":
        return "memory"
    if request.param == "sqlite":
        return str(tmp_path / "fedlog.db")
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture(params=["sqlite", "postgres"])
def sql_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A SQL log location on each SQL dialect in turn."""
    if request.param == "sqlite":
        return str(tmp_path / "fedlog.db")
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture(scope="session")
def charts() -> ChartRegistry:
    """The shipped statecharts."""
    return load_charts()


@pytest.fixture
def clock() -> ManualClock:
    """A clock that moves only when a test says so."""
    return ManualClock()
