"""Indexes on the projection for history questions across all jobs.

``jobs.rounds`` counts each job's task rounds from ``machine_states`` (kind, job_id,
round); "what is in flight" and "which shares ended timed_out / client_dead" look up
machines by (terminal, kind, state). Both stay index lookups on a log of millions of
events, at the price of one more index write per transition (measured by
tools/bench/log_append.py).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_machine_states_kind_job_round", "machine_states", ["kind", "job_id", "round"])
    op.create_index("ix_machine_states_terminal_kind_state", "machine_states", ["terminal", "kind", "state"])


def downgrade() -> None:
    op.drop_index("ix_machine_states_terminal_kind_state", table_name="machine_states")
    op.drop_index("ix_machine_states_kind_job_round", table_name="machine_states")
