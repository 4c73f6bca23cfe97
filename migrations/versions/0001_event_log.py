"""The event log: events, machine_states projection, writer lease, readable views.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _iso(dialect: str, column: str) -> str:
    """SQL rendering integer µs since the epoch as ISO 8601 UTC text with microseconds."""
    if dialect == "postgresql":
        return (
            f"to_char(timestamp 'epoch' + {column} * interval '1 microsecond', "
            "'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')"
        )
    return (
        f"CASE WHEN {column} IS NULL THEN NULL ELSE "
        f"strftime('%Y-%m-%dT%H:%M:%S', {column} / 1000000, 'unixepoch') || '.' || "
        f"substr('000000' || ({column} % 1000000), -6) || 'Z' END"
    )


def upgrade() -> None:
    seq_type = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
    json_type = sa.JSON().with_variant(JSONB(), "postgresql")
    op.create_table(
        "events",
        sa.Column("seq", seq_type, primary_key=True, autoincrement=True),
        sa.Column("machine_id", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("chart_version", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("trigger", sa.String(64), nullable=False),
        sa.Column("source", sa.String(64), nullable=True),
        sa.Column("dest", sa.String(64), nullable=False),
        sa.Column("job_id", sa.String(64), nullable=True),
        sa.Column("round", sa.Integer(), nullable=True),
        sa.Column("site", sa.String(64), nullable=True),
        sa.Column("data", json_type, nullable=True),
        sa.Column("deadline_us", sa.BigInteger(), nullable=True),
        sa.Column("ts_us", sa.BigInteger(), nullable=False),
        sa.Column("writer", sa.String(128), nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_events"),
        sa.UniqueConstraint("machine_id", "version", name="uq_events_machine_id"),
    )
    op.create_index("ix_events_job_id_seq", "events", ["job_id", "seq"])
    op.create_table(
        "machine_states",
        sa.Column("machine_id", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("chart_version", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("terminal", sa.Boolean(), nullable=False),
        sa.Column("deadline_us", sa.BigInteger(), nullable=True),
        sa.Column("job_id", sa.String(64), nullable=True),
        sa.Column("round", sa.Integer(), nullable=True),
        sa.Column("site", sa.String(64), nullable=True),
        sa.Column("created_us", sa.BigInteger(), nullable=False),
        sa.Column("updated_us", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("machine_id", name="pk_machine_states"),
        sqlite_with_rowid=False,
    )
    op.create_index("ix_machine_states_job_id", "machine_states", ["job_id"])
    op.create_table(
        "writer_lease",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("holder", sa.String(256), nullable=False),
        sa.Column("acquired_us", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_writer_lease"),
    )

    dialect = op.get_bind().dialect.name
    op.execute(
        "CREATE VIEW transitions AS SELECT "
        f"e.seq, {_iso(dialect, 'e.ts_us')} AS at, e.machine_id, e.kind, e.job_id, e.round, "
        "e.site, e.trigger, e.source, e.dest, e.version, e.chart_version, e.data, "
        f"{_iso(dialect, 'e.deadline_us')} AS deadline, e.writer, e.ts_us "
        "FROM events e"
    )
    op.execute(
        "CREATE VIEW machines AS SELECT "
        "m.machine_id, m.kind, m.state, m.version, m.terminal, m.job_id, m.round, m.site, "
        f"{_iso(dialect, 'm.deadline_us')} AS deadline, {_iso(dialect, 'm.created_us')} AS created, "
        f"{_iso(dialect, 'm.updated_us')} AS updated, m.chart_version, "
        "m.deadline_us, m.created_us, m.updated_us "
        "FROM machine_states m"
    )


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS machines")
    op.execute("DROP VIEW IF EXISTS transitions")
    op.drop_table("writer_lease")
    op.drop_index("ix_machine_states_job_id", table_name="machine_states")
    op.drop_table("machine_states")
    op.drop_index("ix_events_job_id_seq", table_name="events")
    op.drop_table("events")
