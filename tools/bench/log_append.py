"""Benchmark: durable transitions through ``Runtime.fire`` against same-run baselines.

Prints one JSON object. Everything is measured in this run on this machine (machines
here are noisy: compare the ratios, not absolute figures):

* ``fire_1_per_s`` / ``fire_p99_ms``: one machine fired back-to-back (each fire waits
  until its event is durable), projection maintained.
* ``fire_64_per_s``: 64 machines driven concurrently by 64 asyncio tasks (the server's
  model) through ``fire_async``; ``fire_64_threads_per_s`` is the same with 64 threads
  calling ``fire``.
* ``raw_per_event_per_s`` / ``raw_batched_per_s``: stdlib ``sqlite3`` inserting the same
  rows into a table with the same unique (machine, version) key: one transaction per
  event, and batches of 1000 (no projection: a lower bound on the work).
* ``es_per_event_per_s`` / ``es_batched_per_s``: the ``eventsourcing`` library's SQLite
  application saving one aggregate event per save, and 64 aggregates per save.
* ``replay_per_s``: folding 1,000,000 stored events with the replay code
  (``verify_per_s``: the same fold checking every event against its chart and the
  projection against the fold).
* ``boot_s``: a fresh process opening a log that holds 1,000,000 events, taking the
  writer lease, building the runtime and re-arming timers (``boot_with_imports_s``
  counts interpreter start and imports too).

Usage: ``python tools/bench/log_append.py [--quick] [--postgres URL] [--out FILE]``.
Durability is full (SQLite WAL + synchronous=FULL; PostgreSQL synchronous_commit=on).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from engine.charts.loader import parse_chart
from engine.charts.registry import ChartRegistry
from engine.clock import SystemClock
from engine.log.recorder import NewEvent
from engine.log.sql import SqlRecorder

BENCH_CHART = """
name: bench
version: 1
initial: idle
states:
  idle: {}
  busy: {timeout: 3600}
  done: {terminal: true}
transitions:
  - {trigger: start, source: idle, dest: busy}
  - {trigger: finish, source: busy, dest: idle}
  - {trigger: timeout, source: busy, dest: idle}
  - {trigger: stop, source: [idle, busy], dest: done}
"""

# ~200 bytes of JSON per event, as in the reference measurements
PAYLOAD = {"site": "site-017", "round": 12, "note": "x" * 120, "metrics": {"loss": 0.4123, "acc": 0.91}}


def charts() -> ChartRegistry:
    return ChartRegistry([parse_chart(BENCH_CHART, "bench.yaml")])


def fresh_target(workdir: Path, name: str, pg: str | None) -> str:
    if pg is None:
        return str(workdir / f"{name}.db")
    import psycopg
    from sqlalchemy.engine import make_url

    admin = make_url(pg).set(drivername="postgresql")
    db = f"fedlog_bench_{name}"
    with psycopg.connect(admin.render_as_string(hide_password=False), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{db}"')
    return admin.set(database=db).render_as_string(hide_password=False)


# -- fedlog ----------------------------------------------------------------------


def bench_fire_one(target: str, n: int) -> dict[str, float]:
    from engine.machines.runtime import Runtime

    rec = SqlRecorder(target, lease_holder="bench")
    rt = Runtime(rec, charts(), clock=SystemClock(), writer="bench", run_timers=False)
    mid = rt.create("bench").machine_id
    lat: list[float] = []
    t0 = time.perf_counter()
    for i in range(n):
        s = time.perf_counter()
        rt.fire(mid, "start" if i % 2 == 0 else "finish", PAYLOAD)
        lat.append(time.perf_counter() - s)
    total = time.perf_counter() - t0
    rt.close()
    rec.close()
    lat.sort()
    return {
        "fire_1_per_s": n / total,
        "fire_p50_ms": lat[len(lat) // 2] * 1000,
        "fire_p99_ms": lat[int(len(lat) * 0.99)] * 1000,
    }


def bench_fire_many_async(target: str, machines: int, per_machine: int) -> tuple[float, float]:
    from engine.machines.runtime import Runtime

    rec = SqlRecorder(target, lease_holder="bench")
    rt = Runtime(rec, charts(), clock=SystemClock(), writer="bench", run_timers=False)

    async def drive(mid: str) -> None:
        for i in range(per_machine):
            await rt.fire_async(mid, "start" if i % 2 == 0 else "finish", PAYLOAD)

    before: list[tuple[int, int]] = []

    async def main() -> float:
        ids = [(await rt.create_async("bench")).machine_id for _ in range(machines)]
        before.append(rt.commit_stats)  # count only the measured phase's commits
        t0 = time.perf_counter()
        await asyncio.gather(*(drive(m) for m in ids))
        return time.perf_counter() - t0

    elapsed = asyncio.run(main())
    batches, events = (now - then for now, then in zip(rt.commit_stats, before[0], strict=True))
    rt.close()
    rec.close()
    return machines * per_machine / elapsed, events / max(batches, 1)


def bench_fire_many_threads(target: str, machines: int, per_machine: int) -> float:
    from engine.machines.runtime import Runtime

    rec = SqlRecorder(target, lease_holder="bench")
    rt = Runtime(rec, charts(), clock=SystemClock(), writer="bench", run_timers=False)
    ids = [rt.create("bench").machine_id for _ in range(machines)]
    start = threading.Barrier(machines + 1)

    def drive(mid: str) -> None:
        start.wait()
        for i in range(per_machine):
            rt.fire(mid, "start" if i % 2 == 0 else "finish", PAYLOAD)

    threads = [threading.Thread(target=drive, args=(m,)) for m in ids]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    rt.close()
    rec.close()
    return machines * per_machine / elapsed


# -- raw baselines ---------------------------------------------------------------

RAW_SCHEMA = (
    "CREATE TABLE events (seq INTEGER PRIMARY KEY, machine_id TEXT NOT NULL, kind TEXT NOT NULL, "
    "chart_version INTEGER NOT NULL, version INTEGER NOT NULL, trigger TEXT NOT NULL, source TEXT, "
    "dest TEXT NOT NULL, job_id TEXT, round INTEGER, site TEXT, data TEXT, deadline_us INTEGER, "
    "ts_us INTEGER NOT NULL, writer TEXT NOT NULL, UNIQUE (machine_id, version))"
)
RAW_INSERT = (
    "INSERT INTO events (machine_id, kind, chart_version, version, trigger, source, dest, job_id, "
    "round, site, data, deadline_us, ts_us, writer) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
)


def raw_rows(n: int) -> list[tuple[Any, ...]]:
    data = json.dumps(PAYLOAD)
    now = time.time_ns() // 1000
    return [
        (f"m{i % 64:04d}", "bench", 1, i // 64 + 1, "start", "idle", "busy", None, None, None, data, None, now, "bench")
        for i in range(n)
    ]


def bench_raw_sqlite(workdir: Path, per_event: int, batched: int) -> tuple[float, float]:
    path = workdir / "raw.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(RAW_SCHEMA)
    rows = raw_rows(per_event + batched)
    t0 = time.perf_counter()
    for row in rows[:per_event]:
        conn.execute("BEGIN")
        conn.execute(RAW_INSERT, row)
        conn.execute("COMMIT")
    one = per_event / (time.perf_counter() - t0)
    rest = rows[per_event:]
    t0 = time.perf_counter()
    for i in range(0, len(rest), 1000):
        conn.execute("BEGIN")
        conn.executemany(RAW_INSERT, rest[i : i + 1000])
        conn.execute("COMMIT")
    many = len(rest) / (time.perf_counter() - t0)
    conn.close()
    return one, many


def bench_raw_postgres(target: str, per_event: int, batched: int) -> tuple[float, float]:
    import psycopg
    from sqlalchemy.engine import make_url

    url = make_url(target).set(drivername="postgresql").render_as_string(hide_password=False)
    # same columns as fedlog's PostgreSQL schema: 64-bit times, event data as json
    pg_schema = (RAW_SCHEMA.replace("INTEGER PRIMARY KEY", "BIGSERIAL PRIMARY KEY")
                 .replace("deadline_us INTEGER", "deadline_us BIGINT").replace("ts_us INTEGER", "ts_us BIGINT")
                 .replace("data TEXT", "data JSON"))
    pg_schema = pg_schema.replace("CREATE TABLE events", "CREATE TABLE raw_events")
    insert = RAW_INSERT.replace("?", "%s").replace("INTO events", "INTO raw_events")
    rows = raw_rows(per_event + batched)
    with psycopg.connect(url) as conn:
        conn.execute(pg_schema)
        conn.commit()
        t0 = time.perf_counter()
        for row in rows[:per_event]:
            conn.execute(insert, row)
            conn.commit()
        one = per_event / (time.perf_counter() - t0)
        rest = rows[per_event:]
        t0 = time.perf_counter()
        with conn.cursor() as cur:
            for i in range(0, len(rest), 1000):
                cur.executemany(insert, rest[i : i + 1000])
                conn.commit()
        many = len(rest) / (time.perf_counter() - t0)
    return one, many


def bench_eventsourcing(workdir: Path, per_event: int, batches: int) -> tuple[float, float]:
    from eventsourcing.application import Application
    from eventsourcing.domain import Aggregate, event

    class Machine(Aggregate):
        def __init__(self) -> None:
            self.state = "idle"

        @event("Fired")
        def fired(self, trigger: str, dest: str, data: dict[str, Any]) -> None:
            self.state = dest

    def app(name: str) -> Application:
        return Application(env={
            "PERSISTENCE_MODULE": "eventsourcing.sqlite",
            "SQLITE_DBNAME": str(workdir / f"{name}.db"),
        })

    one_app = app("es_one")
    agg = Machine()
    one_app.save(agg)
    t0 = time.perf_counter()
    for i in range(per_event):
        agg.fired("start" if i % 2 == 0 else "finish", "busy", PAYLOAD)
        one_app.save(agg)
    one = per_event / (time.perf_counter() - t0)

    many_app = app("es_many")
    aggs = [Machine() for _ in range(64)]
    many_app.save(*aggs)
    t0 = time.perf_counter()
    for i in range(batches):
        for a in aggs:
            a.fired("start" if i % 2 == 0 else "finish", "busy", PAYLOAD)
        many_app.save(*aggs)
    many = batches * 64 / (time.perf_counter() - t0)
    return one, many


# -- replay and boot ---------------------------------------------------------------


def fill_log(target: str, total: int, machines: int) -> None:
    """Write ``total`` events for ``machines`` machines straight through the recorder.

    Every machine ends live in ``busy`` with a timer (1 in 10) or ``idle``, so boot has
    timers to re-arm.
    """
    rec = SqlRecorder(target)
    per = total // machines
    now = time.time_ns() // 1000
    batch: list[NewEvent] = []
    for m in range(machines):
        mid = f"m{m:07d}"
        state = None
        for v in range(1, per + 1):
            if v == 1:
                trig, dest = "create", "idle"
            elif state == "idle":
                trig, dest = "start", "busy"
            else:
                trig, dest = "finish", "idle"
            deadline = now + 3_600_000_000 if dest == "busy" and m % 10 == 0 else None
            batch.append(NewEvent(mid, "bench", 1, v, trig, state, dest, False, now, "bench",
                                  PAYLOAD, deadline, f"job{m % 100}", v // 10, f"site{m % 8}"))
            state = dest
            if len(batch) >= 20000:
                rec.append(batch)
                batch = []
    if batch:
        rec.append(batch)
    rec.close()


def bench_replay(target: str) -> dict[str, float]:
    """Fold the whole log (the replay path), then fold it again with full verification."""
    from engine.history import fold, verify_log

    rec = SqlRecorder(target, auto_upgrade=False)
    t0 = time.perf_counter()
    folded = fold(rec, charts())
    fold_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    report = verify_log(rec, charts())
    verify_s = time.perf_counter() - t0
    rec.close()
    if not report.ok:
        raise SystemExit(f"the benchmark log failed verification: {report.problems[:3]}")
    return {
        "replay_events": folded.events,
        "replay_per_s": folded.events / fold_s,
        "replay_s": fold_s,
        "verify_per_s": report.events / verify_s,
    }


BOOT_SCRIPT = """
import time, json, sys
t0 = time.perf_counter()
from engine.charts.loader import parse_chart
from engine.charts.registry import ChartRegistry
from engine.clock import SystemClock
from engine.log.sql import SqlRecorder
from engine.machines.runtime import Runtime
t1 = time.perf_counter()
rec = SqlRecorder(sys.argv[1], lease_holder="bench-boot")
rt = Runtime(rec, ChartRegistry([parse_chart(sys.argv[2])]), clock=SystemClock(), run_timers=True)
report = rt.recover()
t2 = time.perf_counter()
print(json.dumps({"boot_s": t2 - t1, "imports_s": t1 - t0, "timers": report.timers_armed,
                  "last_seq": report.last_seq}))
rt.close(); rec.close()
"""


def bench_boot(target: str) -> dict[str, float]:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", BOOT_SCRIPT, target, BENCH_CHART],
                         check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    result = json.loads(out.stdout)
    return {"boot_s": result["boot_s"], "boot_with_imports_s": wall,
            "boot_timers_rearmed": result["timers"], "boot_log_events": result["last_seq"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller workload, under a minute")
    parser.add_argument("--postgres", metavar="URL", help="run fedlog and the raw baseline on PostgreSQL")
    parser.add_argument("--out", help="also write the JSON to this file")
    args = parser.parse_args()
    quick = args.quick
    n_one = 500 if quick else 3000
    per_machine = 40 if quick else 200
    log_events = 200_000 if quick else 1_000_000
    workdir = Path(tempfile.mkdtemp(prefix="fedlog-bench-"))
    pg = args.postgres
    result: dict[str, Any] = {
        "bench": "log_append", "quick": quick, "backend": "postgresql" if pg else "sqlite",
        "durability": "full", "python": platform.python_version(), "cpus": os.cpu_count(),
    }
    try:
        def progress(msg: str) -> None:
            print(f"[log_append] {msg}", file=sys.stderr, flush=True)

        progress("fire() with one machine")
        result.update(bench_fire_one(fresh_target(workdir, "one", pg), n_one))
        progress("fire_async() with 64 machines")
        rate, per_batch = bench_fire_many_async(fresh_target(workdir, "many", pg), 64, per_machine)
        result["fire_64_per_s"] = rate
        result["fire_64_events_per_commit"] = per_batch
        progress("fire() with 64 threads")
        result["fire_64_threads_per_s"] = bench_fire_many_threads(fresh_target(workdir, "threads", pg), 64, per_machine)
        progress("raw driver baselines")
        if pg:
            one, many = bench_raw_postgres(fresh_target(workdir, "raw", pg), n_one, 20 * 1000 if quick else 100_000)
        else:
            one, many = bench_raw_sqlite(workdir, n_one, 20 * 1000 if quick else 100_000)
        result["raw_per_event_per_s"], result["raw_batched_per_s"] = one, many
        progress("eventsourcing baselines (SQLite)")
        result["es_per_event_per_s"], result["es_batched_per_s"] = bench_eventsourcing(workdir, n_one, 30 if quick else 150)
        progress(f"writing a log of {log_events} events")
        big = fresh_target(workdir, "big", pg)
        fill_log(big, log_events, log_events // 10)
        progress("replay (fold + verify)")
        result.update(bench_replay(big))
        progress("boot")
        result.update(bench_boot(big))
        result["targets"] = {
            "fire_64_vs_raw_batched": result["fire_64_per_s"] / result["raw_batched_per_s"],
            "fire_64_vs_raw_batched_target": 0.25,
            "fire_64_vs_es_batched": result["fire_64_per_s"] / result["es_batched_per_s"],
            "fire_64_vs_es_batched_target": 2.0,
            "fire_p99_ms_target": 5.0,
            "replay_per_s_target": 200_000,
            "boot_s_target": 2.0,
        }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    text = json.dumps(result, indent=2, default=lambda v: round(v, 3) if isinstance(v, float) else str(v))
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
