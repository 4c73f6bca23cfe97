"""Schema upgrades and checks, as plain functions over ``alembic.command``.

``fedlog db upgrade|current|check`` call these; so do the recorder (which upgrades
an older database on open, or names the command to run) and the tests.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, create_engine, inspect, pool, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError

from engine.errors import ConfigError, SchemaError, StoreError
from engine.log import schema
from engine.log.target import describe, to_url
from engine.resources import data_dir

if TYPE_CHECKING:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

__all__ = ["SchemaStatus", "alembic_config", "check", "downgrade", "ensure_schema", "sqlite_snapshot", "status",
           "upgrade"]

#: the newest revision in ``migrations/versions`` (a test checks it is Alembic's head). Opening
#: an up-to-date log compares its stored revision with this and never imports Alembic
#: (~0.3 s of CPU in every process that opens a log); anything else asks Alembic.
HEAD = "0004"
#: Alembic's table holding a database's revision
VERSION_TABLE = "alembic_version"
#: in ``migrations/``: the DDL an empty SQLite database holds after Alembic's upgrade to HEAD
#: (written by ``tools/schema_snapshot.py``; a test checks it against a migrated database)
SQLITE_SNAPSHOT = "sqlite_head.json"

# see _migrating: Alembic's operation proxies are process-global
_MIGRATION_LOCK = threading.Lock()
#: advisory-lock key serializing migrations on PostgreSQL ("fedmig" in ASCII)
_PG_MIGRATION_KEY = 0x6665646D6967


@dataclass(frozen=True, slots=True)
class SchemaStatus:
    """Where a database's schema stands relative to the code."""

    current: str | None
    head: str
    known: bool  # the database's revision exists in this code's migrations

    @property
    def up_to_date(self) -> bool:
        return self.current == self.head


def alembic_config(url: URL | None = None) -> Config:
    """An Alembic ``Config`` pointing at the shipped migrations (no ini file needed)."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(data_dir("migrations")))
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", url.render_as_string(hide_password=False).replace("%", "%%"))
    cfg.attributes["target_metadata"] = schema.metadata
    return cfg


def _engine(target: str | URL | Engine) -> Engine:
    if isinstance(target, Engine):
        return target
    return create_engine(to_url(target), poolclass=pool.NullPool)


@contextmanager
def _reporting(engine: Engine) -> Iterator[None]:
    """Turn a failure to reach or use the database into a ``StoreError`` naming it."""
    try:
        yield
    except DBAPIError as exc:
        raise StoreError(f"cannot use the database {describe(engine.url)}: {exc.orig}") from None


def _head() -> str:
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def _stored_revision(conn: Connection) -> str | None:
    """The revision in Alembic's table (None: no table, or no row), read without Alembic."""
    if not inspect(conn).has_table(VERSION_TABLE):
        return None
    rows = conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).fetchall()
    return str(rows[0][0]) if len(rows) == 1 else None


def status(target: str | URL | Engine) -> SchemaStatus:
    """Read the database's revision and compare it with the code's head."""
    engine = _engine(target)
    with _reporting(engine), engine.connect() as conn:
        if _stored_revision(conn) == HEAD:
            return SchemaStatus(current=HEAD, head=HEAD, known=True)
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config())
    head = script.get_current_head()
    assert head is not None
    with _reporting(engine), engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
    known = current is None or _revision_known(script, current)
    return SchemaStatus(current=current, head=head, known=known)


def _revision_known(script: ScriptDirectory, revision: str) -> bool:
    try:
        return script.get_revision(revision) is not None
    except Exception:  # alembic raises several types for unknown ids
        return False


@contextmanager
def _migrating(engine: Engine) -> Iterator[Connection]:
    """A connection holding the database's migration lock, committed on success.

    Alembic's ``op`` and ``context`` are process-wide proxies, so two migrations
    running in threads of one process would drive each other's connections (seen:
    a hang inside SQLite on a connection another thread had closed): one at a time.
    Across processes the database serializes them -- SQLite with ``BEGIN IMMEDIATE``
    (which also makes SQLite's DDL atomic: the driver would otherwise autocommit each
    statement), PostgreSQL with a transaction-scoped advisory lock -- and Alembic
    reads the revision only after the lock is held, so a migration another process
    just finished is not run again.
    """
    from alembic.util.exc import CommandError

    with _MIGRATION_LOCK, _reporting(engine), engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        elif engine.dialect.name == "postgresql":
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_MIGRATION_KEY})")
        try:
            yield conn
        except CommandError as exc:  # e.g. a revision id that does not exist
            raise ConfigError(f"cannot migrate the database {describe(engine.url)}: {exc}") from None
        conn.commit()


def upgrade(target: str | URL | Engine, revision: str = "head") -> SchemaStatus:
    """Upgrade the database to ``revision`` (default: the newest the code knows)."""
    from alembic import command
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    engine = _engine(target)
    cfg = alembic_config()
    with _migrating(engine) as conn:
        current = MigrationContext.configure(conn).get_current_revision()
        if current is not None and not _revision_known(ScriptDirectory.from_config(cfg), current):
            raise SchemaError(_ahead_message(engine, SchemaStatus(current, _head(), False)))
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
    return status(engine)


def downgrade(target: str | URL | Engine, revision: str) -> SchemaStatus:
    """Downgrade the database to ``revision`` (``base`` removes every fedlog table)."""
    from alembic import command

    engine = _engine(target)
    cfg = alembic_config()
    with _migrating(engine) as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)
    return status(engine)


def check(target: str | URL | Engine) -> list[Any]:
    """Return the differences between the database and the code's metadata (empty: none)."""
    engine = _engine(target)
    st = status(engine)
    if not st.up_to_date:
        raise SchemaError(_behind_message(engine, st) if st.known else _ahead_message(engine, st))
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    with _reporting(engine), engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(ctx, schema.metadata))


def _ahead_message(engine: Engine, st: SchemaStatus) -> str:
    return (
        f"the database {describe(engine.url)} has schema revision {st.current!r}, which this "
        f"version of fedlog does not know (its newest is {st.head!r}); it was written by a newer "
        "fedlog: upgrade fedlog, do not use this version on it"
    )


def _behind_message(engine: Engine, st: SchemaStatus) -> str:
    where = describe(engine.url)
    if st.current is None:
        return f"the database {where} has no fedlog schema yet; run: fedlog db upgrade {where}"
    return (
        f"the database {where} has schema revision {st.current!r}, older than "
        f"this code's {st.head!r}; run: fedlog db upgrade {where}"
    )


def sqlite_snapshot(target: str | URL | Engine) -> dict[str, Any]:
    """The schema of a SQLite database at HEAD as ``{"revision", "statements"}`` (its DDL in creation order)."""
    engine = _engine(target)
    with _reporting(engine), engine.connect() as conn:
        revision = _stored_revision(conn)
        rows = conn.exec_driver_sql("SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY rowid")
        statements = [str(sql) for name, sql in rows if not str(name).startswith("sqlite_")]
    if revision != HEAD:
        raise SchemaError(f"the database {describe(engine.url)} is at revision {revision!r}, not {HEAD!r}")
    return {"revision": HEAD, "statements": statements}


_snapshot: list[str] | None = None


def _snapshot_statements() -> list[str]:
    """The shipped snapshot's statements, or [] when it is missing or not of HEAD (then Alembic runs)."""
    global _snapshot
    if _snapshot is None:
        try:
            doc = json.loads((data_dir("migrations") / SQLITE_SNAPSHOT).read_text())
        except (OSError, ValueError, ConfigError):
            doc = {}
        fresh = isinstance(doc, dict) and doc.get("revision") == HEAD and isinstance(doc.get("statements"), list)
        _snapshot = [str(x) for x in doc["statements"]] if fresh else []
    return _snapshot


def _create_from_snapshot(engine: Engine) -> bool:
    """Give an empty SQLite database the HEAD schema from the snapshot; False if it is not empty.

    What Alembic's upgrade from nothing would leave (the same statements, in the same
    order, and the revision row), without importing Alembic and replaying every
    migration: a fresh log took ~0.12 s of CPU in a new process (the first; ~0.02 s
    each after it), and a simulation opens one per site and one for the server.
    Under the same lock as a migration, so two processes opening the file at once
    create it once: the second finds it not empty and reads its revision.
    """
    statements = _snapshot_statements()
    if not statements:
        return False
    with _reporting(engine), engine.connect() as conn:  # an existing log is not write-locked to learn it
        if conn.exec_driver_sql("SELECT count(*) FROM sqlite_master").scalar():
            return False
    with _MIGRATION_LOCK, _reporting(engine), engine.connect() as conn:
        conn.exec_driver_sql("BEGIN IMMEDIATE")
        if conn.exec_driver_sql("SELECT count(*) FROM sqlite_master").scalar():
            conn.rollback()
            return False
        for statement in statements:
            conn.exec_driver_sql(statement)
        conn.execute(text(f"INSERT INTO {VERSION_TABLE} (version_num) VALUES (:rev)"), {"rev": HEAD})
        conn.commit()
    return True


def ensure_schema(engine: Engine, *, auto_upgrade: bool = True) -> SchemaStatus:
    """Make sure the database has the code's schema before the engine uses it.

    An empty or older database is upgraded when ``auto_upgrade`` is set, otherwise a
    ``SchemaError`` says which command to run. A newer database is always refused.
    An empty SQLite database gets the schema from the shipped snapshot (see
    ``_create_from_snapshot``).
    """
    if auto_upgrade and engine.dialect.name == "sqlite" and _create_from_snapshot(engine):
        return SchemaStatus(current=HEAD, head=HEAD, known=True)
    st = status(engine)
    if st.up_to_date:
        return st
    if not st.known:
        raise SchemaError(_ahead_message(engine, st))
    if st.current is None and not auto_upgrade and _has_events_table(engine):
        raise SchemaError(
            f"the database {describe(engine.url)} has fedlog tables but no schema revision; "
            f"run: fedlog db upgrade {describe(engine.url)}"
        )
    if not auto_upgrade:
        raise SchemaError(_behind_message(engine, st))
    return upgrade(engine)


def _has_events_table(engine: Engine) -> bool:
    with _reporting(engine):
        return inspect(engine).has_table("events")
