"""Event data as ``json``, not ``jsonb``, on PostgreSQL: the log keeps exactly what was written.

``jsonb`` normalizes what it stores: the float ``1e20`` came back as the integer
``100000000000000000000``, ``1e308`` as a 309-digit integer, ``-0.0`` as ``0``, and a
string holding U+0000 was refused outright. ``json`` keeps the text as sent, so every
backend hands back the data it was given. SQLite stores JSON as text already; nothing
changes there. The ``transitions`` view reads ``events.data``, so PostgreSQL needs it
dropped and created again around the type change.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _iso(column: str) -> str:
    """PostgreSQL SQL rendering integer µs since the epoch as ISO 8601 UTC with microseconds."""
    return (
        f"to_char(timestamp 'epoch' + {column} * interval '1 microsecond', "
        "'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')"
    )


# the view exactly as revision 0001 created it on PostgreSQL
_TRANSITIONS = (
    "CREATE VIEW transitions AS SELECT "
    f"e.seq, {_iso('e.ts_us')} AS at, e.machine_id, e.kind, e.job_id, e.round, "
    "e.site, e.trigger, e.source, e.dest, e.version, e.chart_version, e.data, "
    f"{_iso('e.deadline_us')} AS deadline, e.writer, e.ts_us "
    "FROM events e"
)


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP VIEW transitions")
    op.alter_column("events", "data", type_=sa.JSON(), existing_type=JSONB(),
                    existing_nullable=True, postgresql_using="data::json")
    op.execute(_TRANSITIONS)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP VIEW transitions")
    # a string holding U+0000 cannot go back to jsonb; the downgrade then fails and
    # changes nothing (it runs in one transaction)
    op.alter_column("events", "data", type_=JSONB(), existing_type=sa.JSON(),
                    existing_nullable=True, postgresql_using="data::jsonb")
    op.execute(_TRANSITIONS)
