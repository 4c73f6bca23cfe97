"""Benchmark: the history views and replay on a large log (10,000,000 events; --quick 1,000,000).

Prints one JSON object. The log is generated straight into the tables (the shape a
real server writes: per job a job and a workflow machine; per round a task, a
``publish`` record, and per site a share of the task and a task-data stream session),
1,000 jobs x 30 rounds x 36 sites, plus one job of 100,000 events for replay:

* ``query_ms``: every example query of docs/history.md (``job-1`` replaced by a job in
  the middle of the log), best of 3, on SQLite (and on PostgreSQL with ``--pg URL`` or
  ``FEDLOG_TEST_PG_URL``); ``query_plan`` lists the indexes SQLite's plan uses for each.
* ``replay_first_screen_s``: ``fedlog replay DB --job <the 100,000-event job>`` from
  launching the process to its first 50 lines on stdout.
* ``trace_export_events_per_s``: ``--export trace.json`` of that job, log events per second.
* ``generate_s``: writing the log (the baseline a query is compared with: a full scan).

Usage: ``python tools/bench/history.py [--quick] [--out FILE] [--pg URL] [--keep DIR]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from engine.log.sql import open_recorder

DOC = Path(__file__).resolve().parents[2] / "docs" / "history.md"
EVENT_COLUMNS = ("machine_id", "kind", "chart_version", "version", "trigger", "source", "dest", "job_id", "round",
                 "site", "data", "deadline_us", "ts_us", "writer")
STATE_COLUMNS = ("machine_id", "kind", "chart_version", "state", "version", "terminal", "deadline_us", "job_id",
                 "round", "site", "created_us", "updated_us")
BASE_US = 1_796_000_000_000_000


class Gen:
    """Yields event rows and remembers each machine's final row."""

    def __init__(self) -> None:
        self.t = BASE_US
        self.states: dict[str, tuple[Any, ...]] = {}
        self.versions: dict[str, int] = {}
        self.created: dict[str, int] = {}
        self.count = 0

    def ev(self, machine: str, kind: str, trigger: str, source: str | None, dest: str, job: str | None,
           rnd: int | None, site: str | None, data: Any, terminal: bool = False,
           writer: str = "server@1.1") -> tuple[Any, ...]:
        self.t += 1000
        version = self.versions.get(machine, 0) + 1
        self.versions[machine] = version
        self.created.setdefault(machine, self.t)
        self.states[machine] = (machine, kind, 1, dest, version, terminal, None, job, rnd, site,
                                self.created[machine], self.t)
        self.count += 1
        return (machine, kind, 1, version, trigger, source, dest, job, rnd, site,
                None if data is None else json.dumps(data), None, self.t, writer)


def job_events(g: Gen, job: str, rounds: int, sites: int) -> Iterator[tuple[Any, ...]]:
    names = [f"site-{s}" for s in range(1, sites + 1)]
    yield g.ev(job, "job", "create", None, "submitted", job, None, None,
               {"spec": {"name": f"bench {job}", "workflow": "fedavg_torch"}})
    yield g.ev(job, "job", "deploy", "submitted", "deploying", job, None, None, {"deploy_timeout": 300})
    yield g.ev(job, "job", "start", "deploying", "running", job, None, None, {"sites": names})
    wf = f"{job}.workflow"
    yield g.ev(wf, "workflow", "create", None, "running", job, None, None, {"workflow": "fedavg_torch"})
    for r in range(rounds):
        task = f"{job}.t{r}"
        yield g.ev(task, "task", "create", None, "created", job, r, None, {"name": "train"})
        yield g.ev(task, "task", "broadcast", "created", "standing", job, r, None, {"targets": names})
        for site in names:
            ct = f"{task}/{site}"
            yield g.ev(ct, "client_task", "create", None, "assigned", job, r, site, {"task_id": task, "site": site})
            yield g.ev(ct, "client_task", "send", "assigned", "sent", job, r, site, None)
            session = f"tss:{ct}:{r:016x}"
            yield g.ev(session, "stream_send", "create", None, "opened", job, r, site,
                       {"peer": site, "task_id": task, "entry_timeout": 30})
            yield g.ev(session, "stream_send", "offer", "opened", "manifest_offered", job, r, site,
                       {"manifest": f"{r:064x}", "bytes": 5_300_000, "chunks": 6})
            yield g.ev(session, "stream_send", "want", "manifest_offered", "want_known", job, r, site,
                       {"want": 6, "held": 0})
            yield g.ev(session, "stream_send", "start", "want_known", "transferring", job, r, site, None)
            yield g.ev(session, "stream_send", "ack", "transferring", "transferring", job, r, site,
                       {"chunks": 6, "bytes": 5_300_000, "acked": 6})
            yield g.ev(session, "stream_send", "complete", "transferring", "completed", job, r, site,
                       {"bytes": 5_300_000, "chunks": 6, "skipped": 0}, terminal=True)
            yield g.ev(ct, "client_task", "result", "sent", "result_received", job, r, site,
                       {"result": {"model": {"$tensors": f"{r:064x}"}, "n": 64}}, terminal=True)
        yield g.ev(task, "task", "complete", "standing", "completed", job, r, None, {"reason": "all_answered"},
                   terminal=True)
        yield g.ev(wf, "workflow", "record", "running", "running", job, r, None,
                   {"call": 2 * r + 2, "op": "publish", "value": {"model_hash": f"{r:064x}", "metric": 0.5}})
    yield g.ev(wf, "workflow", "finish", "running", "finished", job, None, None, {"result": None}, terminal=True)
    yield g.ev(job, "job", "finish", "running", "finished", job, None, None, {"result_hash": "sha256:" + "0" * 64},
               terminal=True)


def site_events(g: Gen, sites: int) -> Iterator[tuple[Any, ...]]:
    for s in range(1, sites + 1):
        site = f"site-{s}"
        yield g.ev(f"site:{site}", "site", "create", None, "registered", None, None, site, {"site": site})
        yield g.ev(f"site:{site}", "site", "connect", "registered", "active", None, None, site, {"reason": "poll"})


def all_events(g: Gen, jobs: int, big_sites: int) -> Iterator[tuple[Any, ...]]:
    yield from site_events(g, big_sites)
    for j in range(1, jobs + 1):
        yield from job_events(g, f"job-{j}", 30, 36)
    yield from job_events(g, "job-big", 100, big_sites)


def generate_sqlite(path: Path, jobs: int, big_sites: int) -> tuple[int, float]:
    open_recorder(path).close()  # the schema, views and indexes, by the migrations
    started = time.perf_counter()
    g = Gen()
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=OFF")
    insert = f"INSERT INTO events ({', '.join(EVENT_COLUMNS)}) VALUES ({', '.join('?' * len(EVENT_COLUMNS))})"
    rows = all_events(g, jobs, big_sites)
    while True:
        batch = [row for _, row in zip(range(200_000), rows, strict=False)]
        if not batch:
            break
        db.executemany(insert, batch)
        db.commit()
    db.executemany(f"INSERT INTO machine_states ({', '.join(STATE_COLUMNS)}) VALUES "
                   f"({', '.join('?' * len(STATE_COLUMNS))})", list(g.states.values()))
    db.commit()
    db.execute("ANALYZE")
    db.commit()
    db.close()
    return g.count, time.perf_counter() - started


def generate_pg(url: str, jobs: int, big_sites: int) -> tuple[int, float]:
    import psycopg

    open_recorder(url).close()
    started = time.perf_counter()
    g = Gen()
    plain = url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain) as conn, conn.cursor() as cur:
        with cur.copy(f"COPY events ({', '.join(EVENT_COLUMNS)}) FROM STDIN") as copy:
            for row in all_events(g, jobs, big_sites):
                copy.write_row(row)
        with cur.copy(f"COPY machine_states ({', '.join(STATE_COLUMNS)}) FROM STDIN") as copy:
            for row in g.states.values():
                copy.write_row(row)
        cur.execute("ANALYZE")
    return g.count, time.perf_counter() - started


def documented_queries(job: str) -> list[str]:
    text = DOC.read_text(encoding="utf-8")
    return [q.strip().replace("'job-1'", f"'{job}'") for q in re.findall(r"```sql\n(.*?)```", text, re.S)]


def time_queries(url: str, queries: list[str], sqlite: bool) -> tuple[list[float], list[list[str]]]:
    from sqlalchemy import create_engine, text

    engine = create_engine(f"sqlite:///{url}" if sqlite else url)
    timings: list[float] = []
    plans: list[list[str]] = []
    with engine.connect() as conn:
        for q in queries:
            best = float("inf")
            for _ in range(3):
                started = time.perf_counter()
                conn.execute(text(q)).fetchall()
                best = min(best, time.perf_counter() - started)
            timings.append(round(best * 1000, 2))
            if sqlite:
                plan = conn.execute(text("EXPLAIN QUERY PLAN " + q)).fetchall()
                plans.append(sorted({m.group(1) for row in plan for m in re.finditer(r"INDEX (\w+)", str(row[-1]))}))
    engine.dispose()
    return timings, plans


def first_screen(db: Path, job: str, lines: int = 50) -> float:
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "engine", "replay", str(db), "--job", job],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for i, _ in enumerate(proc.stdout, 1):
        if i >= lines:
            break
    elapsed = time.perf_counter() - started
    proc.kill()
    proc.wait()
    return elapsed


def export_rate(db: Path, job: str, events: int, folder: Path) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "engine", "replay", str(db), "--job", job, "--export",
                    str(folder / "trace.json")], check=True, capture_output=True)
    return events / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="about 1,000,000 events (100 jobs)")
    parser.add_argument("--out")
    parser.add_argument("--pg", default=os.environ.get("FEDLOG_TEST_PG_URL"),
                        help="also measure on this PostgreSQL database (it is filled: use a scratch one)")
    parser.add_argument("--keep", help="keep the SQLite log in this folder")
    args = parser.parse_args()
    jobs = 100 if args.quick else 1000
    big_sites = 111  # 100 rounds x 111 sites: about 100,000 events in one job
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="fedlog-history-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    db = folder / "history.db"
    if db.exists():
        db.unlink()
    events, generate_s = generate_sqlite(db, jobs, big_sites)
    print(f"generated {events:,} events in {generate_s:.1f} s", file=sys.stderr)
    middle = f"job-{jobs // 2}"
    queries = documented_queries(middle)
    sqlite_ms, plans = time_queries(str(db), queries, True)
    big_events = sqlite3.connect(db).execute("SELECT count(*) FROM events WHERE job_id = 'job-big'").fetchone()[0]
    result: dict[str, Any] = {
        "events": events, "jobs": jobs + 1, "generate_s": round(generate_s, 1),
        "query_ms": sqlite_ms, "query_plan": plans, "queries": [q.split("\n")[0][:90] for q in queries],
        "slowest_query_ms": max(sqlite_ms),
        "replay_job_events": big_events,
        "replay_first_screen_s": round(first_screen(db, "job-big"), 3),
        "trace_export_events_per_s": round(export_rate(db, "job-big", big_events, folder)),
    }
    if args.pg:
        import psycopg
        from sqlalchemy.engine import make_url

        admin = make_url(args.pg).set(drivername="postgresql")
        name = f"fedlog_bench_{os.getpid()}"
        with psycopg.connect(admin.render_as_string(hide_password=False), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        url = admin.set(database=name).render_as_string(hide_password=False)
        try:
            pg_events, pg_generate = generate_pg(url, jobs, big_sites)
            pg_ms, _ = time_queries(url.replace("postgresql://", "postgresql+psycopg://", 1), queries, False)
            result.update({"pg_events": pg_events, "pg_generate_s": round(pg_generate, 1), "pg_query_ms": pg_ms,
                           "pg_slowest_query_ms": max(pg_ms)})
        finally:
            with psycopg.connect(admin.render_as_string(hide_password=False), autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if not args.keep:
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()


if __name__ == "__main__":
    main()
