"""``fedlog replay`` and ``fedlog sql`` through the real command-line entry point."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import pytest
from sqlalchemy import create_engine, pool, text

from engine.cli import main
from engine.clock import ManualClock, format_us
from engine.commands import replay as replay_command
from engine.history import replay as replay_module
from engine.log import migrate
from engine.log.sql import open_recorder
from engine.log.target import to_url
from engine.machines.runtime import Runtime
from tests.history.support import job_chart, registry, write_charts, write_log

SUMMARY = re.compile(r"^folded (\d+) events?(?: up to (.+))? into (\d+) machines? in [\d.]+ s \(([\d,]+|-) events/s\)$")


@pytest.fixture
def charts_dir(tmp_path: Path) -> str:
    return str(write_charts(tmp_path / "charts"))


@pytest.fixture
def log_url(sql_url: str) -> str:
    write_log(sql_url)
    return sql_url


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str], str]:
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out.splitlines(), captured.err


def table_rows(lines: list[str]) -> dict[str, list[str]]:
    """The machine rows of a replay table, by machine id (cells split on runs of spaces)."""
    assert lines[0].split() == ["machine", "kind", "state", "version", "terminal", "deadline", "job", "round", "site"]
    assert set(lines[1]) <= {"-", " "}
    rows = {}
    for line in lines[2:]:
        if SUMMARY.match(line) or line.startswith(("verified", "verification", "  ")):
            break
        cells = line.split()
        rows[cells[0]] = cells
    return rows


def test_replay_prints_every_machine(log_url: str, charts_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    with open_recorder(log_url) as log:
        projection = {row.machine_id: row for row in log.machines()}
        total = log.last_seq()
    status, out, err = run(capsys, "replay", log_url, "--charts", charts_dir)
    assert status == 0 and err == ""
    rows = table_rows(out)
    assert set(rows) == set(projection)
    for mid, cells in rows.items():
        row = projection[mid]
        assert cells[1:5] == [row.kind, row.state, str(row.version), "true" if row.terminal else "false"]
        if row.deadline_us is not None:
            assert cells[5] == format_us(row.deadline_us)
    assert rows["gauge-a"][5:] == ["J1", "2", "a"]
    match = SUMMARY.match(out[-1])
    assert match is not None and match.group(1) == str(total) and match.group(3) == "7"


def test_replay_verify_clean(log_url: str, charts_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "replay", log_url, "--verify", "--charts", charts_dir)
    assert status == 0
    assert out[-1] == "verified: 21 events, 7 machines, projection matches"
    assert SUMMARY.match(out[-2])


def test_replay_verify_reports_every_problem(
    log_url: str, charts_dir: str, capsys: pytest.CaptureFixture[str]
) -> None:
    engine = create_engine(to_url(log_url), poolclass=pool.NullPool)
    with engine.begin() as conn:
        conn.execute(text("UPDATE events SET dest = 'running' WHERE machine_id = 'job-1' AND version = 2"))
        conn.execute(text("UPDATE machine_states SET version = 5 WHERE machine_id = 'job-4'"))
        s2, s3 = conn.execute(text(
            "SELECT seq FROM events WHERE machine_id = 'job-1' AND version IN (2, 3) ORDER BY seq")).scalars()
    engine.dispose()
    status, out, err = run(capsys, "replay", log_url, "--verify", "--charts", charts_dir)
    assert status == 1 and err == ""
    start = out.index("verification FAILED: 3 problems:")
    problems = out[start + 1:]
    assert len(problems) == 3 and all(p.startswith("  ") for p in problems)
    assert problems[0] == (
        f"  seq {s2}: job 'job-1' v2: trigger 'deploy' from 'submitted' leads to 'deploying' in job "
        "chart v1, but the event enters 'running'"
    )
    assert problems[1].startswith(f"  seq {s3}: job 'job-1' v3: source state 'deploying'")
    assert "version: machine_states has 5, the events fold to 1" in problems[2]


def test_replay_default_charts_verify_a_job_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(tmp_path / "jobs.db")
    with open_recorder(path) as log, Runtime(log, registry(), clock=ManualClock(), run_timers=False) as rt:
        for i in range(3):
            rt.create("job", machine_id=f"j{i}")
            rt.fire(f"j{i}", "deploy")
        rt.fire("j0", "abort")
    status, out, _ = run(capsys, "replay", path, "--verify")
    assert status == 0 and out[-1] == "verified: 7 events, 3 machines, projection matches"
    assert job_chart().version == 1


def test_replay_names_missing_charts(log_url: str, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    only_v1 = str(write_charts(tmp_path / "v1", 1))
    status, out, err = run(capsys, "replay", log_url, "--charts", only_v1)
    assert status == 2 and out == []
    assert err.startswith("fedlog replay: error: event seq ")
    assert "gauge version 2" in err and "--charts DIR" in err
    status, out, _ = run(capsys, "replay", log_url, "--charts", only_v1, "--verify")
    assert status == 1
    assert any("written under gauge chart version 2, which is unknown" in line for line in out)


def test_replay_until_seq_and_time(log_url: str, charts_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    with open_recorder(log_url) as log:
        events = list(log.read())
    cut = next(e for e in events if e.machine_id == "job-1" and e.version == 3)  # job-1 starts
    status, out, _ = run(capsys, "replay", log_url, "--charts", charts_dir, "--until", str(cut.seq))
    assert status == 0
    assert table_rows(out)["job-1"][2] == "running"
    assert set(table_rows(out)) == {e.machine_id for e in events if e.seq <= cut.seq}
    match = SUMMARY.match(out[-1])
    assert match is not None and match.group(1) == str(cut.seq) and match.group(2) == f"seq {cut.seq}"

    status, out, _ = run(capsys, "replay", log_url, "--charts", charts_dir, "--until", format_us(cut.ts_us),
                         "--verify")
    assert status == 0
    assert table_rows(out)["job-1"][2] == "running"
    assert out[-1] == (
        f"verified: {cut.seq} events, 5 machines (projection not compared: it holds the newest "
        f"states, not those at {format_us(cut.ts_us)})"
    )


def test_replay_until_garbage(log_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, "replay", log_url, "--until", "soon")
    assert status == 2 and out == []
    assert err == (
        "fedlog replay: error: --until 'soon': expected a sequence number (a whole number such as 1200) "
        "or an ISO 8601 time such as 2026-01-02T03:04:05Z or 2026-01-02T03:04:05.250+01:00\n"
    )


def test_replay_one_machine(log_url: str, charts_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "replay", log_url, "--charts", charts_dir, "--machine", "gauge-b", "--verify")
    assert status == 0
    assert list(table_rows(out)) == ["gauge-b"]
    assert out[-1] == "verified: 4 events, 1 machine, projection matches"
    status, out, err = run(capsys, "replay", log_url, "--charts", charts_dir, "--machine", "nope")
    assert status == 2 and err == "fedlog replay: error: no machine 'nope' in the log\n"


def test_replay_progress(
    log_url: str, charts_dir: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(replay_module, "CHUNK_ROWS", 4)
    monkeypatch.setattr(replay_command, "PROGRESS_EVERY", 10)
    status, _, err = run(capsys, "replay", log_url, "--charts", charts_dir)
    assert status == 0 and err == ""  # stderr is not a terminal: quiet unless asked
    status, _, err = run(capsys, "replay", log_url, "--charts", charts_dir, "--progress")
    assert status == 0
    assert err.splitlines() == [
        "replay: 12 events folded (seq 12 of 21)",
        "replay: 20 events folded (seq 20 of 21)",
        "replay: 21 events folded (seq 21 of 21)",  # the last count, once a long fold reported
    ]


def test_replay_missing_database_is_not_created(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "typo.db"
    for command in (["replay", str(path)], ["sql", str(path), "SELECT 1"]):
        status, out, err = run(capsys, *command)
        assert status == 2 and out == []
        assert f"error: no such database: {path}" in err
        assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_replay_old_schema_names_the_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(tmp_path / "old.db")
    migrate.upgrade(path, "0001")
    status, _, err = run(capsys, "replay", path)
    assert status == 2
    assert f"run: fedlog db upgrade {path}" in err
    assert migrate.status(path).current == "0001"  # reading upgraded nothing


def test_sql_table(log_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, "sql", log_url,
                           "SELECT machine_id, state, version FROM machines WHERE kind = 'job' ORDER BY machine_id")
    assert status == 0 and err == ""
    assert out == [
        "machine_id  state      version",
        "----------  ---------  -------",
        "job-1       finished         4",
        "job-2       deploying        2",
        "job-3       aborted          2",
        "job-4       submitted        1",
        "(4 rows)",
    ]


def test_sql_csv_and_json(log_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    query = ("SELECT seq, machine_id, trigger, source, dest, at FROM transitions "
             "WHERE machine_id = 'job-1' ORDER BY seq")
    status, out, _ = run(capsys, "sql", log_url, query, "--format", "csv")
    assert status == 0
    rows = list(csv.reader(io.StringIO("\n".join(out))))
    assert rows[0] == ["seq", "machine_id", "trigger", "source", "dest", "at"]
    assert [r[2:5] for r in rows[1:]] == [
        ["create", "", "submitted"], ["deploy", "submitted", "deploying"],
        ["start", "deploying", "running"], ["finish", "running", "finished"],
    ]
    status, out, _ = run(capsys, "sql", log_url, query, "--format", "json")
    assert status == 0
    objects = json.loads("\n".join(out))
    assert [o["trigger"] for o in objects] == ["create", "deploy", "start", "finish"]
    assert objects[0]["source"] is None and isinstance(objects[0]["seq"], int)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", objects[0]["at"])


def test_sql_error_is_a_message_not_a_traceback(log_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, "sql", log_url, "SELECT * FROM nowhere")
    assert status == 2 and out == []
    assert err.startswith("fedlog sql: error: query failed on ")
    assert "nowhere" in err and "Traceback" not in err


def test_sql_statement_that_writes_is_refused_and_changes_nothing(log_url: str,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, "sql", log_url, "DELETE FROM events")
    assert status == 2 and out == []
    assert err == ("fedlog sql: error: refused: this DELETE statement would change the log, and fedlog sql reads "
                   "only; run it again with --write to commit it (nothing was run)\n")
    # a write dressed as a read is refused by the database itself (opened read-only)
    status, out, err = run(capsys, "sql", log_url, "WITH x AS (SELECT 1 AS n) DELETE FROM events")
    assert status == 2 and "fedlog sql: error: query failed on" in err
    status, out, _ = run(capsys, "sql", log_url, "SELECT count(*) AS n FROM events", "--format", "json")
    assert json.loads("\n".join(out)) == [{"n": 21}]


def test_sql_write_commits_when_asked(log_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run(capsys, "sql", log_url, "UPDATE machine_states SET site = 'z' WHERE machine_id = 'job-4'",
                         "--write")
    assert status == 0 and err == "1 row(s) affected; committed\n"
    status, out, _ = run(capsys, "sql", log_url, "SELECT site FROM machine_states WHERE machine_id = 'job-4'",
                         "--format", "csv")
    assert out == ["site", "z"]


def test_sql_views_lists_every_view_with_its_columns(log_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "sql", log_url, "--views")
    views = {line.split(":")[0]: line.split(": ")[1].split(", ") for line in out}
    assert status == 0
    assert set(views) >= {"transitions", "machines", "jobs", "rounds", "tasks", "client_tasks", "streams", "sites"}
    assert views["rounds"][:2] == ["job_id", "round"] and "server_runs" in views["rounds"]


def test_sql_prompt_takes_multi_line_statements_and_goes_on_after_an_error(
        log_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import io

    script = "SELECT count(*)\n  AS n FROM events;\nSELECT * FROM nowhere;\n.views\nSELECT 2 AS two\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    status, out, _ = run(capsys, "sql", log_url, "--format", "csv")
    text = "\n".join(out)
    assert "n\n21" in text and "error: query failed on" in text and "nowhere" in text
    assert any(line.startswith("rounds: job_id, round") for line in out)
    assert out[-2:] == ["two", "2"] and status == 0


