"""History views: jobs, rounds, tasks, client_tasks, streams, sites — and the indexes they need.

Every view is plain SQL over ``events`` (and the ``machine_states`` projection), the
same columns on SQLite and PostgreSQL: times as ISO 8601 UTC text with microseconds
(``*_at``) and as integer µs (``*_us``), durations in seconds (``*_s``). JSON fields
are read with ``->``/``->>``, which both dialects have (SQLite 3.38+). Each view
groups by the machine (or the job and round) and carries the job, round and site as
grouping columns, so a ``WHERE job_id = ...`` on a view is pushed down to the
``(kind, job_id, machine_id)`` index instead of scanning the log. docs/history.md
documents every column and the questions they answer.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

VIEWS = ("jobs", "rounds", "tasks", "client_tasks", "streams", "sites")


def _iso(dialect: str, column: str) -> str:
    """SQL rendering integer µs since the epoch as ISO 8601 UTC text with microseconds."""
    if dialect == "postgresql":
        return (
            f"to_char(timestamp 'epoch' + ({column}) * interval '1 microsecond', "
            "'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')"
        )
    return (
        f"CASE WHEN ({column}) IS NULL THEN NULL ELSE "
        f"strftime('%Y-%m-%dT%H:%M:%S', ({column}) / 1000000, 'unixepoch') || '.' || "
        f"substr('000000' || (({column}) % 1000000), -6) || 'Z' END"
    )


def _int(expr: str) -> str:
    return f"CAST({expr} AS BIGINT)"


def _before_slash(dialect: str, column: str) -> str:
    """The part of ``column`` before its first '/' (a client task's task id)."""
    if dialect == "postgresql":
        return f"split_part({column}, '/', 1)"
    return f"substr({column}, 1, instr({column}, '/') - 1)"


def _views(d: str) -> dict[str, str]:
    def iso(col: str) -> str:
        return _iso(d, col)

    ended = "CASE WHEN m.terminal THEN m.updated_us END"
    jobs = f"""
CREATE VIEW jobs AS
SELECT e.job_id,
       MAX(CASE WHEN e.trigger = 'create' THEN e.data -> 'spec' ->> 'name' END) AS name,
       MAX(CASE WHEN e.trigger = 'create' THEN e.data -> 'spec' ->> 'workflow' END) AS workflow,
       m.state,
       {iso('MIN(e.ts_us)')} AS submitted_at,
       {iso("MAX(CASE WHEN e.trigger = 'start' THEN e.ts_us END)")} AS started_at,
       {iso(ended)} AS ended_at,
       ({ended} - MIN(e.ts_us)) / 1000000.0 AS duration_s,
       (SELECT COUNT(DISTINCT t.round) FROM machine_states t
         WHERE t.kind = 'task' AND t.job_id = e.job_id AND t.round IS NOT NULL) AS rounds,
       MAX(CASE WHEN e.trigger = 'start' THEN e.data ->> 'sites' END) AS sites,
       MAX(CASE WHEN e.trigger = 'finish' THEN e.data ->> 'result_hash' END) AS result_hash,
       MAX(CASE WHEN e.trigger IN ('fail', 'abort', 'timeout') THEN e.data ->> 'reason' END) AS reason,
       MIN(e.ts_us) AS submitted_us,
       MAX(CASE WHEN e.trigger = 'start' THEN e.ts_us END) AS started_us,
       {ended} AS ended_us
FROM events e JOIN machine_states m ON m.machine_id = e.machine_id
WHERE e.kind = 'job'
GROUP BY e.job_id, m.state, m.terminal, m.updated_us
"""
    rounds = f"""
CREATE VIEW rounds AS
SELECT e.job_id, e.round,
       {iso('MIN(e.ts_us)')} AS started_at,
       {iso('MAX(e.ts_us)')} AS ended_at,
       (MAX(e.ts_us) - MIN(e.ts_us)) / 1000000.0 AS duration_s,
       COUNT(DISTINCT CASE WHEN e.kind = 'task' THEN e.machine_id END) AS tasks,
       SUM(CASE WHEN e.kind = 'client_task' AND e.trigger = 'create' THEN 1 ELSE 0 END) AS responses_expected,
       SUM(CASE WHEN e.kind = 'client_task' AND e.trigger = 'result' THEN 1 ELSE 0 END) AS responses_received,
       SUM(CASE WHEN e.kind = 'client_task' AND e.trigger IN ('timeout', 'site_dead') THEN 1 ELSE 0 END)
           AS responses_missing,
       SUM(CASE WHEN e.kind = 'task' AND e.trigger = 'drop_result' THEN 1 ELSE 0 END) AS results_dropped,
       SUM(CASE WHEN e.kind = 'workflow' AND e.data ->> 'op' = 'publish' THEN 1 ELSE 0 END) AS published,
       COUNT(DISTINCT CASE WHEN e.kind IN ('task', 'client_task', 'workflow') THEN e.writer END) AS server_runs,
       MAX(CASE WHEN e.kind = 'swarm_round' THEN e.data ->> 'aggregator' END) AS aggregator_site,
       MAX(CASE WHEN e.kind = 'workflow' AND e.data ->> 'op' = 'publish'
                THEN e.data -> 'value' ->> 'metric' END) AS best_metric,
       MIN(e.ts_us) AS started_us, MAX(e.ts_us) AS ended_us
FROM events e
WHERE e.job_id IS NOT NULL AND e.round IS NOT NULL
  AND e.kind IN ('task', 'client_task', 'workflow', 'task_data', 'stream_send', 'swarm_round')
GROUP BY e.job_id, e.round
"""
    # a task's shares are "<task>/<site>": the ids between "<task>/" and "<task>0" in byte order
    # (PostgreSQL compares them in the C collation: a linguistic one such as en_US ignores '/')
    c_ = ' COLLATE "C"' if d == "postgresql" else ""
    shares = (f"c.kind = 'client_task' AND c.job_id = e.job_id AND c.machine_id{c_} > (e.machine_id || '/'){c_} "
              f"AND c.machine_id{c_} < (e.machine_id || '0'){c_}")
    tasks = f"""
CREATE VIEW tasks AS
SELECT e.machine_id AS task_id, e.job_id, e.round,
       MAX(CASE WHEN e.trigger = 'create' THEN e.data ->> 'name' END) AS name,
       MAX(CASE WHEN e.trigger IN ('broadcast', 'send', 'relay') THEN e.trigger END) AS method,
       m.state,
       {iso('MIN(e.ts_us)')} AS scheduled_at,
       {iso(ended)} AS ended_at,
       ({ended} - MIN(e.ts_us)) / 1000000.0 AS duration_s,
       (SELECT COUNT(*) FROM events c WHERE {shares} AND c.trigger = 'create') AS targets,
       (SELECT COUNT(*) FROM events c WHERE {shares} AND c.trigger = 'result') AS results,
       (SELECT MIN(c.ts_us) FROM events c WHERE {shares} AND c.trigger = 'result') AS first_result_us,
       SUM(CASE WHEN e.trigger = 'drop_result' THEN 1 ELSE 0 END) AS results_dropped,
       MAX(CASE WHEN e.trigger IN ('complete', 'wait_elapsed', 'timeout', 'fail', 'cancel', 'abort', 'targets_dead')
                THEN COALESCE(e.data ->> 'reason', e.trigger) END) AS reason,
       MIN(e.ts_us) AS scheduled_us, {ended} AS ended_us
FROM events e JOIN machine_states m ON m.machine_id = e.machine_id
WHERE e.kind = 'task'
GROUP BY e.machine_id, e.job_id, e.round, m.state, m.terminal, m.updated_us
"""
    task_of = _before_slash(d, "e.machine_id")
    client_tasks = f"""
CREATE VIEW client_tasks AS
SELECT e.machine_id AS client_task_id, {task_of} AS task_id, e.job_id, e.round, e.site, m.state,
       {iso('MIN(e.ts_us)')} AS assigned_at,
       {iso("MIN(CASE WHEN e.trigger = 'send' THEN e.ts_us END)")} AS sent_at,
       {iso("MAX(CASE WHEN e.trigger = 'result' THEN e.ts_us END)")} AS result_at,
       (MAX(CASE WHEN e.trigger = 'result' THEN e.ts_us END) - MIN(e.ts_us)) / 1000000.0 AS schedule_to_result_s,
       (MAX(CASE WHEN e.trigger = 'result' THEN e.ts_us END)
        - MIN(CASE WHEN e.trigger = 'send' THEN e.ts_us END)) / 1000000.0 AS sent_to_result_s,
       SUM(CASE WHEN e.trigger IN ('send', 'resend') THEN 1 ELSE 0 END) AS send_count,
       SUM(CASE WHEN e.trigger = 'resend' THEN 1 ELSE 0 END) AS resends,
       (SELECT COUNT(*) FROM events x WHERE x.machine_id = {task_of} AND x.trigger = 'drop_result'
          AND x.data ->> 'site' = e.site) AS results_dropped,
       MIN(e.ts_us) AS assigned_us,
       MIN(CASE WHEN e.trigger = 'send' THEN e.ts_us END) AS sent_us,
       MAX(CASE WHEN e.trigger = 'result' THEN e.ts_us END) AS result_us,
       {ended} AS ended_us
FROM events e JOIN machine_states m ON m.machine_id = e.machine_id
WHERE e.kind = 'client_task'
GROUP BY e.machine_id, e.job_id, e.round, e.site, m.state, m.terminal, m.updated_us
"""
    first_resume = "MIN(CASE WHEN e.trigger = 'resume' THEN e.seq END)"
    ack_chunks, want_chunks = _int("e.data ->> 'chunks'"), _int("e.data ->> 'want'")
    acked = f"COALESCE(SUM(CASE WHEN e.trigger = 'ack' THEN {ack_chunks} END), 0)"
    wanted = f"COALESCE(MAX(CASE WHEN e.trigger = 'want' THEN {want_chunks} END), 0)"
    streams = f"""
CREATE VIEW streams AS
SELECT e.machine_id AS session_id, e.kind AS direction, e.job_id, e.round, e.site, m.state,
       MAX(CASE WHEN e.trigger = 'create' THEN COALESCE(e.data ->> 'peer', e.data ->> 'target', e.data ->> 'sender')
           END) AS peer,
       MAX(CASE WHEN e.trigger = 'offer' THEN e.data ->> 'manifest' END) AS manifest,
       MAX(CASE WHEN e.trigger = 'offer' THEN {_int("e.data ->> 'bytes'")} END) AS bytes_planned,
       MAX(CASE WHEN e.trigger = 'offer' THEN {_int("e.data ->> 'chunks'")} END) AS chunks_planned,
       MAX(CASE WHEN e.trigger = 'want' THEN {_int("e.data ->> 'want'")} END) AS chunks_wanted,
       MAX(CASE WHEN e.trigger = 'want' THEN {_int("e.data ->> 'held'")} END) AS chunks_skipped,
       COALESCE(SUM(CASE WHEN e.trigger = 'ack' THEN {_int("e.data ->> 'bytes'")} END), 0) AS bytes_sent,
       CASE WHEN m.state = 'completed'
            THEN MAX(CASE WHEN e.trigger = 'offer' THEN {_int("e.data ->> 'bytes'")} END)
                 - COALESCE(SUM(CASE WHEN e.trigger = 'ack' THEN {_int("e.data ->> 'bytes'")} END), 0)
       END AS bytes_skipped,
       SUM(CASE WHEN e.trigger = 'ack' THEN 1 ELSE 0 END) AS acks,
       CASE WHEN {acked} > {wanted} THEN {acked} - {wanted} ELSE 0 END AS chunks_resent,
       SUM(CASE WHEN e.trigger = 'resume' THEN 1 ELSE 0 END) AS resumes,
       COALESCE(SUM(CASE WHEN e.trigger = 'ack' AND e.seq > (SELECT {first_resume.replace('e.', 'r.')}
                                                              FROM events r WHERE r.machine_id = e.machine_id)
                         THEN {_int("e.data ->> 'bytes'")} END), 0) AS bytes_after_resume,
       {iso('MIN(e.ts_us)')} AS started_at,
       {iso(ended)} AS ended_at,
       ({ended} - MIN(e.ts_us)) / 1000000.0 AS duration_s,
       MAX(CASE WHEN e.trigger IN ('fail', 'expire', 'abort') THEN e.data ->> 'reason' END) AS reason,
       MIN(e.ts_us) AS started_us, {ended} AS ended_us
FROM events e JOIN machine_states m ON m.machine_id = e.machine_id
WHERE e.kind IN ('stream_send', 'stream_receive')
GROUP BY e.machine_id, e.kind, e.job_id, e.round, e.site, m.state, m.terminal, m.updated_us
"""
    sites = f"""
CREATE VIEW sites AS
SELECT COALESCE(m.site, e.machine_id) AS site, m.state,
       {iso('MIN(e.ts_us)')} AS registered_at,
       {iso('m.updated_us')} AS state_since,
       {iso("MAX(CASE WHEN e.trigger IN ('connect', 'heartbeat', 'reconnect') THEN e.ts_us END)")}
           AS last_heartbeat_at,
       SUM(CASE WHEN e.trigger IN ('connect', 'reconnect') THEN 1 ELSE 0 END) AS connects,
       SUM(CASE WHEN e.dest = 'missing' THEN 1 ELSE 0 END) AS times_missing,
       SUM(CASE WHEN e.dest = 'dead' THEN 1 ELSE 0 END) AS times_dead,
       MAX(CASE WHEN e.trigger IN ('connect', 'heartbeat', 'reconnect') THEN e.ts_us END) AS last_heartbeat_us,
       m.updated_us AS state_since_us
FROM events e JOIN machine_states m ON m.machine_id = e.machine_id
WHERE e.kind = 'site'
GROUP BY e.machine_id, m.site, m.state, m.updated_us
"""
    return {"jobs": jobs, "rounds": rounds, "tasks": tasks, "client_tasks": client_tasks, "streams": streams,
            "sites": sites}


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    op.create_index("ix_events_kind_job_machine", "events", ["kind", "job_id", "machine_id"])
    op.create_index("ix_events_job_round_kind", "events", ["job_id", "round", "kind"])
    for sql in _views(dialect).values():
        op.execute(sql)


def downgrade() -> None:
    for name in reversed(VIEWS):
        op.execute(f"DROP VIEW IF EXISTS {name}")
    op.drop_index("ix_events_job_round_kind", table_name="events")
    op.drop_index("ix_events_kind_job_machine", table_name="events")
