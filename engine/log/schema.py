"""The event log's tables, as SQLAlchemy Core metadata.

This is the schema the code expects; ``migrations/`` is the only way a database gets
it (the migrations do not import this module, and a test checks that upgrading an
empty database yields exactly this metadata on every dialect).

Two tables carry the engine:

* ``events`` — append-only. One row per transition. ``seq`` is the global order,
  ``(machine_id, version)`` is unique so two writers can never both write version n
  of one machine. Times are integer microseconds since the epoch, UTC.
* ``machine_states`` — the projection: one row per machine with its current state,
  version and next timer deadline, written in the same transaction as the event, so
  boot reads live machines here instead of folding the whole log.

``writer_lease`` names the process that holds the writer lease (PostgreSQL keeps
the lock itself as an advisory lock; SQLite as a file lock beside the database).
Readable views (``transitions``, ``machines``) are created by the migrations.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    UniqueConstraint,
)

__all__ = ["NAMING_CONVENTION", "events", "machine_states", "metadata", "writer_lease"]

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)

# SQLite aliases an INTEGER PRIMARY KEY to the rowid (fast, monotonic); BIGINT would not.
_Seq = BigInteger().with_variant(Integer(), "sqlite")
# json, not jsonb, on PostgreSQL: jsonb rewrites numbers (1e20 comes back as an
# integer, -0.0 as 0) and refuses U+0000; the log must hand back what was written.
# Queries can still cast: data::jsonb.
_Json = JSON()

events = Table(
    "events",
    metadata,
    Column("seq", _Seq, primary_key=True, autoincrement=True),
    Column("machine_id", String(64), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("chart_version", Integer, nullable=False),
    Column("version", Integer, nullable=False),
    Column("trigger", String(64), nullable=False),
    Column("source", String(64), nullable=True),
    Column("dest", String(64), nullable=False),
    Column("job_id", String(64), nullable=True),
    Column("round", Integer, nullable=True),
    Column("site", String(64), nullable=True),
    Column("data", _Json, nullable=True),
    Column("deadline_us", BigInteger, nullable=True),
    Column("ts_us", BigInteger, nullable=False),
    Column("writer", String(128), nullable=False),
    UniqueConstraint("machine_id", "version"),
)
Index("ix_events_job_id_seq", events.c.job_id, events.c.seq)
# the history views (migration 0003) filter by kind and job, and group a job's rounds
Index("ix_events_kind_job_machine", events.c.kind, events.c.job_id, events.c.machine_id)
Index("ix_events_job_round_kind", events.c.job_id, events.c.round, events.c.kind)

machine_states = Table(
    "machine_states",
    metadata,
    Column("machine_id", String(64), primary_key=True),
    Column("kind", String(32), nullable=False),
    Column("chart_version", Integer, nullable=False),
    Column("state", String(64), nullable=False),
    Column("version", Integer, nullable=False),
    Column("terminal", Boolean, nullable=False),
    Column("deadline_us", BigInteger, nullable=True),
    Column("job_id", String(64), nullable=True),
    Column("round", Integer, nullable=True),
    Column("site", String(64), nullable=True),
    Column("created_us", BigInteger, nullable=False),
    Column("updated_us", BigInteger, nullable=False),
    # one B-tree instead of rowid table + primary-key index: the projection is updated
    # once per transition, so every avoided index write counts
    sqlite_with_rowid=False,
)
Index("ix_machine_states_job_id", machine_states.c.job_id)
# history questions across jobs (migration 0004): rounds per job, machines by state
Index("ix_machine_states_kind_job_round", machine_states.c.kind, machine_states.c.job_id, machine_states.c.round)
Index("ix_machine_states_terminal_kind_state", machine_states.c.terminal, machine_states.c.kind,
      machine_states.c.state)

writer_lease = Table(
    "writer_lease",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("holder", String(256), nullable=False),
    Column("acquired_us", BigInteger, nullable=False),
)
