"""Schema upgrades and checks, as plain functions over ``alembic.command``.

``fedlog db upgrade|current|check`` call these; so do the recorder (which upgrades
an older database on open, or names the command to run) and the tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, inspect, pool
from sqlalchemy.engine import URL

from engine.errors import SchemaError
from engine.log import schema
from engine.log.target import describe, to_url
from engine.resources import data_dir

__all__ = ["SchemaStatus", "alembic_config", "check", "downgrade", "ensure_schema", "status", "upgrade"]


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


def status(target: str | URL | Engine) -> SchemaStatus:
    """Read the database's revision and compare it with the code's head."""
    engine = _engine(target)
    script = ScriptDirectory.from_config(alembic_config())
    head = script.get_current_head()
    assert head is not None
    with engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
    known = current is None or _revision_known(script, current)
    return SchemaStatus(current=current, head=head, known=known)


def _revision_known(script: ScriptDirectory, revision: str) -> bool:
    try:
        return script.get_revision(revision) is not None
    except Exception:  # alembic raises several types for unknown ids
        return False


def upgrade(target: str | URL | Engine, revision: str = "head") -> SchemaStatus:
    """Upgrade the database to ``revision`` (default: the newest the code knows)."""
    engine = _engine(target)
    _refuse_newer(engine)
    cfg = alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
    return status(engine)


def downgrade(target: str | URL | Engine, revision: str) -> SchemaStatus:
    """Downgrade the database to ``revision`` (``base`` removes every fedlog table)."""
    engine = _engine(target)
    cfg = alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)
    return status(engine)


def check(target: str | URL | Engine) -> list[Any]:
    """Return the differences between the database and the code's metadata (empty: none)."""
    engine = _engine(target)
    st = status(engine)
    if not st.up_to_date:
        raise SchemaError(_behind_message(engine, st) if st.known else _ahead_message(engine, st))
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(ctx, schema.metadata))


def _refuse_newer(engine: Engine) -> None:
    st = status(engine)
    if not st.known:
        raise SchemaError(_ahead_message(engine, st))


def _ahead_message(engine: Engine, st: SchemaStatus) -> str:
    return (
        f"the database {describe(engine.url)} has schema revision {st.current!r}, which this "
        f"version of fedlog does not know (its newest is {st.head!r}); it was written by a newer "
        "fedlog: upgrade fedlog, do not use this version on it"
    )


def _behind_message(engine: Engine, st: SchemaStatus) -> str:
    return (
        f"the database {describe(engine.url)} has schema revision {st.current!r}, older than "
        f"this code's {st.head!r}; run: fedlog db upgrade {describe(engine.url)}"
    )


def ensure_schema(engine: Engine, *, auto_upgrade: bool = True) -> SchemaStatus:
    """Make sure the database has the code's schema before the engine uses it.

    An empty or older database is upgraded when ``auto_upgrade`` is set, otherwise a
    ``SchemaError`` says which command to run. A newer database is always refused.
    """
    st = status(engine)
    if st.up_to_date:
        return st
    if not st.known:
        raise SchemaError(_ahead_message(engine, st))
    if st.current is None and inspect(engine).has_table("events") and not auto_upgrade:
        raise SchemaError(
            f"the database {describe(engine.url)} has fedlog tables but no schema revision; "
            f"run: fedlog db upgrade {describe(engine.url)}"
        )
    if not auto_upgrade:
        raise SchemaError(_behind_message(engine, st))
    return upgrade(engine)
