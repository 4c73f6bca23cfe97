"""Benchmark: empty broadcast_and_wait rounds through HTTP, dispatch rate, and recovery time.

Prints one JSON object. Three parts:

1. **Baseline (in-process)**: rounds through the task manager alone, sites as asyncio
   tasks calling ``process_task_request``/``process_submission`` directly (no HTTP),
   on a SQLite log with full durability.
2. **Through HTTP**: a real ``fedlog server`` process (SQLite, full durability) runs the
   ``empty_rounds`` job; the sites are threads of this process, each with its own
   keep-alive HTTP connection, long-polling and submitting empty results. A round is
   timed by the controller (``ctl.now()`` before scheduling and after the outcome):
   ``round_p50_ms`` / ``round_p99_ms`` keyed by the site count (8, 32, 128).
   ``dispatch_per_s``: assignments handed out per second over the 128-site rounds.
   ``http_over_inprocess``: the ratio of the two p50s per site count.
3. **Recovery**: a job runs on 8 sites; the server is SIGKILLed mid-job and started
   again. ``recovery_s`` is the time from launching the new server process to the
   first result it accepts (the job making progress), with a log of at least
   100,000 events (history written before the job); ``recovery_small_log_s`` is the
   same on a log holding only the job (the baseline); ``recovery_boot_s`` the boot
   sequence inside the server (log, projection, timers, job replay).

Usage: ``python tools/bench/rounds.py [--quick] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from engine.charts.loader import load_charts
from engine.client.api import AdminApi, SiteApi
from engine.client.transport import HttpTransport
from engine.clock import SystemClock
from engine.errors import RemoteError, TransportError
from engine.log.sql import SqlRecorder
from engine.machines.runtime import Runtime
from engine.provision import SERVER_DIR, load_identity, provision
from engine.server.serve import ServerProcess
from engine.tasks import Task, TaskCompletionStatus, TaskManager

JOB = {"workflow": "engine.jobs.bench:empty_rounds", "executor": "engine.jobs.bench:noop"}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


# -- 1. in-process baseline -----------------------------------------------------------------


async def inprocess_rounds(workdir: Path, n_sites: int, rounds: int) -> dict[str, float]:
    rec = SqlRecorder(str(workdir / f"inproc-{n_sites}.db"), lease_holder="bench-rounds")
    clock = SystemClock()
    rt = Runtime(rec, load_charts(), clock=clock, writer="bench", run_timers=False)
    tm = TaskManager(rt, clock=clock, job_id=f"bench{n_sites}")
    sites = [f"site-{i:03d}" for i in range(n_sites)]
    for site in sites:
        await tm.register_site(site)
        await tm.client_is_active(site)

    async def site_round(site: str) -> None:
        assignment = await tm.process_task_request(site)
        if assignment is not None:
            await tm.process_submission(site, assignment.task_id, assignment.client_task_id, {})

    latencies = []
    for r in range(rounds):
        t0 = time.perf_counter()
        task_id = await tm.broadcast(Task("noop", data={"round": r}), targets=sites)
        await asyncio.gather(*(site_round(s) for s in sites))
        outcome = await tm.wait(task_id)
        if outcome.status is not TaskCompletionStatus.OK or len(outcome.results) != n_sites:
            raise SystemExit(f"in-process round {r} with {n_sites} sites ended {outcome.status}")
        latencies.append((time.perf_counter() - t0) * 1000)
    await tm.aclose()
    rt.close()
    rec.close()
    return {"p50": statistics.median(latencies), "p99": pct(latencies, 0.99)}


# -- 2. through HTTP --------------------------------------------------------------------------


class Sites:
    """Site threads: each polls and submits empty results over its own keep-alive connection."""

    def __init__(self, fed: Path, names: list[str], url: str) -> None:
        self.stop = threading.Event()
        self.accepted: list[float] = []  # monotonic times of accepted submissions
        self.handed = 0
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._serve, args=(fed, name, url), daemon=True) for name in names]
        for t in self.threads:
            t.start()

    def _serve(self, fed: Path, name: str, url: str) -> None:
        transport = HttpTransport(url, load_identity(fed / name).token, timeout=30)
        api = SiteApi(transport, name)
        try:
            while not self.stop.is_set():
                try:
                    answer = api.poll(2.0)
                    a = answer["assignment"]
                    if a is None:
                        continue
                    out = api.submit(a["task_id"], a["client_task_id"], {})
                except (TransportError, RemoteError):
                    self.stop.wait(0.01)  # the server is restarting: retry soon
                    continue
                with self._lock:
                    self.handed += 1
                    if out["outcome"] == "accepted":
                        self.accepted.append(time.monotonic())
        finally:
            transport.close()

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)


def start_server(fed: Path, db: Path, port: int = 0) -> ServerProcess:
    args = ["server", "--credentials", str(fed / SERVER_DIR), "--db", str(db), "--port", str(port), "--no-tls"]
    return ServerProcess(args, module="engine.cli").start(timeout=60)


def wait_job(admin: AdminApi, job_id: str, *, rounds_at_least: int | None = None, timeout: float = 600) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            job = admin.show_job(job_id)
        except TransportError:
            time.sleep(0.02)
            continue
        if job["state"] in ("finished", "failed", "aborted"):
            return job
        if rounds_at_least is not None and job["rounds"] >= rounds_at_least:
            return job
        time.sleep(0.02)
    raise SystemExit(f"job {job_id} made no progress in {timeout} s")


def http_rounds(workdir: Path, n_sites: int, rounds: int) -> dict[str, float]:
    names = [f"site-{i:03d}" for i in range(n_sites)]
    fed = workdir / f"fed-{n_sites}"
    provision(fed, names)
    server = start_server(fed, workdir / f"http-{n_sites}.db")
    sites = Sites(fed, names, server.url)
    admin = AdminApi(HttpTransport(server.url, load_identity(fed / "admin").token, timeout=60))
    try:
        job = admin.submit_job({**JOB, "min_sites": n_sites, "args": {"rounds": rounds}})
        t0 = time.perf_counter()
        done = wait_job(admin, job["job_id"])
        wall = time.perf_counter() - t0
        if done["state"] != "finished":
            raise SystemExit(f"HTTP rounds with {n_sites} sites: job {done['state']}: {done.get('reason')}")
        latencies = [us / 1000 for us in admin.job_result(job["job_id"])["result"]["latency_us"]]
    finally:
        admin.transport.close()
        sites.close()
        server.stop()
    # the first round includes the sites' first poll after deployment; count it like the others
    return {"p50": statistics.median(latencies), "p99": pct(latencies, 0.99),
            "dispatch_per_s": n_sites * rounds / (sum(latencies) / 1000), "wall_s": wall}


# -- 3. recovery ----------------------------------------------------------------------------


async def prefill(db: Path, names: list[str], events: int) -> int:
    """Write finished history (broadcast rounds of another job) until the log holds ``events``."""
    rec = SqlRecorder(str(db), lease_holder="bench-prefill")
    clock = SystemClock()
    rt = Runtime(rec, load_charts(), clock=clock, writer="bench", run_timers=False)
    tm = TaskManager(rt, clock=clock, job_id="history")
    for site in names:
        await tm.client_is_active(site)

    async def drain(site: str) -> None:
        while (a := await tm.process_task_request(site)) is not None:
            await tm.process_submission(site, a.task_id, a.client_task_id, {})

    while rec.last_seq() < events:
        ids = [await tm.broadcast(Task("noop", data={}), targets=names) for _ in range(32)]
        await asyncio.gather(*(drain(s) for s in names))
        for task_id in ids:
            await tm.wait(task_id)
    total = rec.last_seq()
    await tm.aclose()
    rt.close()
    rec.close()
    return total


def recovery(workdir: Path, name: str, history_events: int) -> dict[str, Any]:
    names = [f"site-{i}" for i in range(8)]
    fed = workdir / f"fed-{name}"
    provision(fed, names)
    db = workdir / f"{name}.db"
    events = asyncio.run(prefill(db, names, history_events)) if history_events else 0
    server = start_server(fed, db)
    port = server.port
    sites = Sites(fed, names, server.url)
    admin = AdminApi(HttpTransport(server.url, load_identity(fed / "admin").token, timeout=30))
    try:
        job = admin.submit_job({**JOB, "min_sites": len(names), "args": {"rounds": 100_000}})
        wait_job(admin, job["job_id"], rounds_at_least=3)
        server.kill()
        t0 = time.monotonic()
        server = start_server(fed, db, port)
        ready = time.monotonic() - t0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            after = [t for t in list(sites.accepted) if t > t0]
            if after:
                break
            time.sleep(0.001)
        else:
            raise SystemExit("the job made no progress after the restart")
        boot = admin.stats()["boot"]
        admin.abort_job(job["job_id"], "benchmark over")
    finally:
        admin.transport.close()
        sites.close()
        server.stop()
    return {"recovery_s": min(after) - t0, "ready_s": ready, "boot_s": boot["boot_s"], "events": boot["events"],
            "history_events": events}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, under a minute")
    parser.add_argument("--out", help="also write the JSON to this file")
    args = parser.parse_args()
    rounds = 10 if args.quick else 40
    workdir = Path(tempfile.mkdtemp(prefix="fedlog-rounds-"))
    result: dict[str, Any] = {
        "bench": "rounds", "quick": args.quick, "rounds": rounds, "backend": "sqlite (synchronous=FULL)",
        "sites_as": "threads of the benchmark process, one keep-alive HTTP connection each",
        "server": "fedlog server process (uvicorn + httptools)",
        "round_p50_ms": {}, "round_p99_ms": {}, "inprocess_round_p50_ms": {}, "http_over_inprocess": {},
        "target_round_p50_ms_32": 50, "target_recovery_s": 1.0,
    }
    try:
        for n in (8, 32, 128):
            print(f"[rounds] {n} sites: in-process baseline, then HTTP", file=sys.stderr, flush=True)
            base = asyncio.run(inprocess_rounds(workdir, n, rounds))
            http = http_rounds(workdir, n, rounds)
            result["inprocess_round_p50_ms"][n] = base["p50"]
            result["round_p50_ms"][n] = http["p50"]
            result["round_p99_ms"][n] = http["p99"]
            result["http_over_inprocess"][n] = http["p50"] / base["p50"]
            if n == 128:
                result["dispatch_per_s"] = http["dispatch_per_s"]
        print("[rounds] recovery: small log, then 100,000 events", file=sys.stderr, flush=True)
        small = recovery(workdir, "small", 0)
        large = recovery(workdir, "large", 100_000)
        result["recovery_small_log_s"] = small["recovery_s"]
        result["recovery_s"] = large["recovery_s"]
        result["recovery_ready_s"] = large["ready_s"]
        result["recovery_boot_s"] = large["boot_s"]
        result["recovery_log_events"] = large["events"]
        result["recovery_over_small_log"] = large["recovery_s"] / small["recovery_s"]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    raw = json.dumps(result, default=str)
    text = json.dumps(json.loads(raw, parse_float=lambda s: round(float(s), 4)), indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
