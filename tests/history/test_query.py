"""``run_query``: the views in both dialects, precise errors, nothing created or committed."""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from engine.clock import parse_time_us
from engine.errors import ConfigError, StoreError
from engine.history.access import open_log
from engine.history.query import ReadOnlyRefused, is_read_only, query, run_query
from engine.history.render import write_json
from tests.history.support import write_log


@pytest.fixture
def log_url(sql_url: str) -> str:
    write_log(sql_url)
    return sql_url


def test_transitions_view(log_url: str) -> None:
    with open_log(log_url) as log:
        events = list(log.read())
    columns, rows = query(log_url, "SELECT * FROM transitions ORDER BY seq")
    assert columns[:4] == ["seq", "at", "machine_id", "kind"]
    assert len(rows) == len(events) > 20
    by_name = [dict(zip(columns, row, strict=True)) for row in rows]
    for row, event in zip(by_name, events, strict=True):
        assert (row["seq"], row["machine_id"], row["kind"], row["trigger"], row["source"], row["dest"]) == (
            event.seq, event.machine_id, event.kind, event.trigger, event.source, event.dest)
        assert (row["version"], row["chart_version"], row["round"], row["site"]) == (
            event.version, event.chart_version, event.round, event.site)
        assert parse_time_us(row["at"]) == event.ts_us
        if event.deadline_us is None:
            assert row["deadline"] is None
        else:
            assert parse_time_us(row["deadline"]) == event.deadline_us
    deploy = next(r for r in by_name if r["machine_id"] == "job-1" and r["trigger"] == "deploy")
    data = deploy["data"] if isinstance(deploy["data"], dict) else json.loads(deploy["data"])
    assert data == {"deploy_timeout": 60}


def test_machines_view(log_url: str) -> None:
    with open_log(log_url) as log:
        projection = {row.machine_id: row for row in log.machines()}
    columns, rows = query(log_url, "SELECT * FROM machines ORDER BY machine_id")
    assert [r[0] for r in rows] == sorted(projection)
    for values in rows:
        row = dict(zip(columns, values, strict=True))
        stored = projection[row["machine_id"]]
        assert (row["kind"], row["state"], row["version"], bool(row["terminal"])) == (
            stored.kind, stored.state, stored.version, stored.terminal)
        assert (row["job_id"], row["round"], row["site"]) == (stored.job_id, stored.round, stored.site)
        assert parse_time_us(row["updated"]) == stored.updated_us
        assert parse_time_us(row["created"]) == stored.created_us
        assert (row["deadline"] and parse_time_us(row["deadline"])) == stored.deadline_us
    live = query(log_url, "SELECT machine_id FROM machines WHERE NOT terminal ORDER BY machine_id")[1]
    assert [r[0] for r in live] == ["gauge-b", "job-2", "job-4"]


def test_aggregates_render_as_plain_json_numbers(log_url: str) -> None:
    # PostgreSQL's sum() of an integer column is a numeric (Decimal); JSON shows a number
    out = io.StringIO()
    with run_query(log_url, "SELECT kind, sum(version) AS total, count(*) AS n FROM events "
                            "GROUP BY kind ORDER BY kind") as result:
        write_json(result.columns, result.rows, out)
    assert json.loads(out.getvalue()) == [
        {"kind": "gauge", "total": 1 + 2 + 3 + 4 + 5 + 1 + 2 + 3 + 4 + 1 + 2 + 3, "n": 12},
        {"kind": "job", "total": 10 + 3 + 3 + 1, "n": 9},
    ]


def test_sql_errors_are_precise(log_url: str) -> None:
    with pytest.raises(StoreError) as caught:
        query(log_url, "SELECT * FROM nowhere")
    message = str(caught.value)
    assert message.startswith("query failed on ")
    assert "no such table: nowhere" in message or 'relation "nowhere" does not exist' in message
    with pytest.raises(StoreError, match="syntax error"):
        query(log_url, "SELEC 1")
    with pytest.raises(StoreError, match="nosuchcolumn"):
        query(log_url, "SELECT nosuchcolumn FROM events")


def test_empty_statement(log_url: str) -> None:
    with pytest.raises(ConfigError, match="empty query"):
        query(log_url, "  \n ")


def test_percent_and_colon_reach_the_database_as_written(log_url: str) -> None:
    columns, rows = query(
        log_url,
        "SELECT machine_id, ':x' AS colon, '100%' AS pct FROM machines "
        "WHERE machine_id LIKE 'job-%' ORDER BY machine_id",
    )
    assert rows == [(f"job-{i}", ":x", "100%") for i in range(1, 5)]


def test_missing_sqlite_file_is_not_created(tmp_path: Path) -> None:
    path = tmp_path / "nothing.db"
    with pytest.raises(ConfigError, match=r"no such database: .*nothing\.db"):
        query(str(path), "SELECT 1")
    assert not path.exists()
    with pytest.raises(ConfigError, match="directory .* does not exist"):
        query(str(tmp_path / "no" / "dir.db"), "SELECT 1")
    assert list(tmp_path.iterdir()) == []


def test_missing_postgres_database(pg_url: str) -> None:
    missing = make_url(pg_url).set(database=f"fedlog_absent_{uuid.uuid4().hex[:8]}")
    url = missing.render_as_string(hide_password=False)
    with pytest.raises(StoreError, match=f"cannot connect to .*{missing.database}.*does not exist"):
        query(url, "SELECT 1")


def test_writes_are_refused_before_they_run_and_the_database_is_read_only(log_url: str) -> None:
    for statement in ("UPDATE machine_states SET state = 'hacked'", "CREATE TABLE scratch (x INTEGER)",
                      "-- a comment first\nDELETE FROM events", "PRAGMA user_version = 7"):
        with pytest.raises(ReadOnlyRefused, match="would change the log.*--write"):
            query(log_url, statement)
    # a write the keyword check lets through is refused by the database itself
    with pytest.raises(StoreError):
        query(log_url, "WITH x AS (SELECT 1 AS n) UPDATE machine_states SET state = 'hacked'")
    assert query(log_url, "SELECT count(*) FROM machine_states WHERE state = 'hacked'")[1] == [(0,)]
    with pytest.raises(StoreError, match="scratch"):
        query(log_url, "SELECT * FROM scratch")
    with open_log(log_url) as log:
        assert log.get_machine("job-1") is not None


def test_read_only_judgement() -> None:
    assert is_read_only("  select 1") and is_read_only("WITH a AS (SELECT 1) SELECT * FROM a")
    assert is_read_only("EXPLAIN QUERY PLAN SELECT 1") and is_read_only("PRAGMA table_info(events)")
    assert not is_read_only("insert into x values (1)") and not is_read_only("/* c */ drop view jobs")


def test_ddl_with_write_is_transactional_until_committed(log_url: str) -> None:
    # DDL runs inside the transaction too (SQLite's driver would autocommit it without the explicit BEGIN)
    with run_query(log_url, "CREATE TABLE scratch (x INTEGER)", write=True) as result:
        assert not result.returns_rows and result.committed
    assert query(log_url, "SELECT count(*) FROM scratch")[1] == [(0,)]


def test_write_commits(log_url: str) -> None:
    # the seam a later --write flag uses
    with run_query(log_url, "UPDATE machine_states SET site = 'z' WHERE machine_id = 'job-4'",
                   write=True) as result:
        assert result.committed and result.rowcount == 1
    assert query(log_url, "SELECT site FROM machine_states WHERE machine_id = 'job-4'")[1] == [("z",)]
