"""History views: every example query of docs/history.md runs on SQLite and PostgreSQL over a real job's log.

The log is a ``fedlog simulate`` of the CNN job (tensors travel as chunk streams) with
the server SIGKILLed after aggregating round 1, so the views have every kind of row
to show: rounds, a round whose aggregation ran again, task-data stream sessions,
sites. The same job on both dialects must give the same answers where the answer
does not depend on timing.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.history.query import query
from engine.jobs.catalog import CATALOG
from engine.sim import SimOptions, simulate
from tests.conftest import fresh_pg_database

pytestmark = pytest.mark.slow

DOC = Path(__file__).resolve().parents[2] / "docs" / "history.md"
ROUNDS = 3


def documented_queries() -> list[str]:
    return [q.strip() for q in re.findall(r"```sql\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)]


def run_job(workdir: Path, db: str | None) -> dict[str, Any]:
    spec = dict(CATALOG["cnn"])
    spec["args"] = {**spec["args"], "rounds": ROUNDS, "epochs": 1}
    summary = simulate(SimOptions(spec=spec, clients=2, workdir=workdir, db=db, kill_server_at=["1.aggregate"],
                                  timeout=300))
    assert summary["status"] == "finished", summary
    return summary


#: run a test on the SQLite log only (the module's fixture is parametrized over both dialects)
SQLITE_ONLY = pytest.mark.parametrize("simulated", ["sqlite"], indirect=True)


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def simulated(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """(the server log's URL, the simulation's folder)."""
    work = tmp_path_factory.mktemp(f"views-{request.param}")
    if request.param == "sqlite":
        run_job(work, None)
        yield str(work / "server.db"), work
        return
    with fresh_pg_database() as url:
        run_job(work, url)
        yield url, work


@pytest.fixture
def log(simulated: tuple[str, Path]) -> str:
    return simulated[0]


def test_the_doc_has_at_least_twelve_example_queries() -> None:
    assert len(documented_queries()) >= 12


@pytest.mark.parametrize("n", range(len(documented_queries())))
def test_every_documented_query_runs(log: str, n: int) -> None:
    columns, rows = query(log, documented_queries()[n])
    assert columns, "a documented query must return columns"
    assert isinstance(rows, list)


def test_the_views_describe_the_job(log: str) -> None:
    _, jobs = query(log, "SELECT job_id, state, rounds, result_hash, duration_s FROM jobs")
    assert len(jobs) == 1 and jobs[0][1] == "finished" and jobs[0][2] == ROUNDS and jobs[0][3].startswith("sha256:")
    assert float(jobs[0][4]) > 0
    _, rounds = query(log, "SELECT round, responses_expected, responses_received, server_runs, published "
                           "FROM rounds WHERE job_id = 'job-1' ORDER BY round")
    assert [r[0] for r in rounds] == list(range(ROUNDS))
    assert all(r[1] == 2 and r[2] == 2 for r in rounds), rounds
    # the server died after aggregating round 1, before recording it: that round was written by two servers
    rerun = {r[0] for r in rounds if r[3] > 1}
    assert 1 in rerun, rounds
    _, tasks = query(log, "SELECT task_id, state, targets, results FROM tasks WHERE job_id = 'job-1'")
    assert len(tasks) == ROUNDS and all(t[1] == "completed" and t[2] == 2 and t[3] == 2 for t in tasks)
    _, shares = query(log, "SELECT site, state, send_count FROM client_tasks WHERE job_id = 'job-1'")
    assert sorted({s[0] for s in shares}) == ["site-1", "site-2"] and {s[1] for s in shares} == {"result_received"}
    _, streams = query(log, "SELECT state, bytes_planned, bytes_sent, chunks_planned FROM streams "
                            "WHERE direction = 'stream_send' AND session_id LIKE 'tss:%'")
    assert len(streams) >= 2 * ROUNDS and all(s[0] == "completed" and s[1] > 0 for s in streams), streams
    _, sites = query(log, "SELECT site, state, connects FROM sites ORDER BY site")
    assert [s[0] for s in sites] == ["site-1", "site-2"] and all(s[2] >= 1 for s in sites)
    _, data = query(log, documented_queries()[-3])  # task data per round
    assert len(data) == ROUNDS and all(row[4] + row[5] == 2 for row in data), data


def test_a_job_filter_uses_the_index_on_sqlite(tmp_path: Path) -> None:
    from engine.log.sql import open_recorder

    db = tmp_path / "plan.db"
    open_recorder(db).close()
    _, plan = query(db, "EXPLAIN QUERY PLAN SELECT * FROM client_tasks WHERE job_id = 'job-7'")
    text = " ".join(str(row[-1]) for row in plan)
    assert "ix_events_kind_job_machine" in text, text


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    from engine.cli import main

    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_replay_job_timeline_marks_rounds_lanes_and_the_restart(log: str, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = cli(capsys, "replay", log, "--job", "job-1")
    assert status == 0
    assert out.startswith("job job-1: ") and "site-1" in out and "server/task" in out
    assert all(f"── round {r}:" in out for r in range(ROUNDS))
    status, one, _ = cli(capsys, "replay", log, "--job", "job-1", "--round", "1")
    assert "── round 1:" in one and "── round 0:" not in one


def test_replay_at_a_point_shows_every_machine_of_the_job_then(log: str, capsys: pytest.CaptureFixture[str]) -> None:
    _, first = query(log, "SELECT MIN(seq) FROM events WHERE job_id = 'job-1' AND kind = 'client_task' "
                          "AND trigger = 'result'")
    status, out, _ = cli(capsys, "replay", log, "--job", "job-1", "--at", str(first[0][0]))
    assert status == 0
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["machine", "kind", "state"]
    states = {line.split()[0]: line.split()[2] for line in lines[2:] if line and not line.startswith("(")}
    assert states["job-1"] == "running"
    assert list(states.values()).count("result_received") == 1  # just the first result


def test_replay_exports_a_chrome_trace_and_an_html_report(log: str, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    import json

    trace = tmp_path / "trace.json"
    assert cli(capsys, "replay", log, "--job", "job-1", "--export", str(trace))[0] == 0
    events = json.loads(trace.read_text())["traceEvents"]
    names = {e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    assert {"site-1", "site-2", "server/task"} <= names
    assert any(e["ph"] == "X" and e["name"] == "client_task result_received" for e in events)
    assert any(e["ph"] == "C" and e["name"] == "stream bytes" for e in events)
    report = tmp_path / "report.html"
    assert cli(capsys, "replay", log, "--job", "job-1", "--export", str(report))[0] == 0
    page = report.read_text()
    assert f'data-rounds="{ROUNDS}" data-sites="2"' in page and "<script" not in page and "http" not in page.split(
        "xmlns=")[0]
    assert page.count("class='round'") == ROUNDS


def test_replay_aggregate_reproduces_every_rounds_model_hash(simulated: tuple[str, Path],
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    url, work = simulated
    for r in range(ROUNDS):
        status, out, _ = cli(capsys, "replay", url, "--job", "job-1", "--round", str(r), "--aggregate",
                             "--chunks", str(work / "server.chunks"))
        assert status == 0 and "matches the recorded one" in out, out


def test_replay_aggregate_reports_a_mismatch_precisely(simulated: tuple[str, Path]) -> None:
    from engine.chunks import LocalChunkStore
    from engine.history.access import open_log
    from engine.history.reaggregate import reaggregate

    url, work = simulated
    with open_log(url) as log, LocalChunkStore(work / "server.chunks") as chunks:
        report = reaggregate(log, chunks, "job-1", 0)
        assert report.matches
        tampered = type(report)(report.job_id, report.round, report.sites, "0" * 64, report.computed_hash)
    assert "MISMATCH" in tampered.describe() and "0" * 64 in tampered.describe()


@SQLITE_ONLY  # the test edits a copy of the log file
def test_replay_diff_finds_where_two_runs_part(log: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil
    import sqlite3

    copy = tmp_path / "other.db"
    shutil.copy(log, copy)
    status, out, _ = cli(capsys, "replay", "diff", log, str(copy), "--job", "job-1")
    assert status == 0 and "agree" in out
    with sqlite3.connect(copy) as db:  # another day's run: site-2's round-1 result differed
        db.execute("UPDATE events SET data = '{\"result\": {\"n\": 1}}' WHERE job_id = 'job-1' AND "
                   "kind = 'client_task' AND trigger = 'result' AND site = 'site-2' AND round = 1")
    status, out, _ = cli(capsys, "replay", "diff", log, str(copy), "--job", "job-1")
    assert status == 1 and "first divergence at job-1.t" in out and "/site-2 version" in out


@SQLITE_ONLY  # the page does not depend on the dialect
def test_the_html_report_renders_in_headless_chromium(log: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    import os
    import shutil
    import subprocess

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        message = "headless Chromium is not installed (Debian: apt-get install chromium)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message + "; in CI the report test must run")
        pytest.skip(message)
    report = tmp_path / "report.html"
    assert cli(capsys, "replay", log, "--job", "job-1", "--export", str(report))[0] == 0
    flags = [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1100,1000"]
    dom = subprocess.run([*flags, "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    # the browser parsed the page into the elements it shows: the summary, a band per round, a lane per site
    assert f'data-rounds="{ROUNDS}"' in dom and 'data-sites="2"' in dom
    assert dom.count('class="round"') == ROUNDS
    assert dom.count('class="lane"') >= 3 and "site-1" in dom and "site-2" in dom
    assert dom.count('class="site"') >= 1  # stream progress lines
    shot = tmp_path / "report.png"
    subprocess.run([*flags, f"--screenshot={shot}", report.as_uri()], capture_output=True, timeout=120, check=True)
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
