"""Benchmark: broadcast_and_wait rounds through the task manager, sites as asyncio tasks.

Prints one JSON object. This measures the task layer alone, in one process (no HTTP
yet): each site is an asyncio task that, when a round is scheduled, asks the
manager for work and submits an empty result, exactly the calls the server's routes
will make. The log is a SQLite file with full durability.

* ``round_p50_ms`` / ``round_p99_ms`` (keyed by site count): from scheduling the
  broadcast to its outcome (every site answered, min_responses = all).
* ``dispatch_per_s``: tasks handed out per second over the 128-site rounds.

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
import time
from pathlib import Path
from typing import Any

from engine.charts.loader import load_charts
from engine.clock import SystemClock
from engine.log.sql import SqlRecorder
from engine.machines.runtime import Runtime
from engine.tasks import Task, TaskCompletionStatus, TaskManager


async def run_rounds(workdir: Path, n_sites: int, rounds: int) -> dict[str, float]:
    rec = SqlRecorder(str(workdir / f"rounds-{n_sites}.db"), lease_holder="bench-rounds")
    clock = SystemClock()
    rt = Runtime(rec, load_charts(), clock=clock, writer="bench", run_timers=False)
    tm = TaskManager(rt, clock=clock, job_id=f"bench{n_sites}")
    sites = [f"site-{i:03d}" for i in range(n_sites)]
    for site in sites:
        await tm.register_site(site)
        await tm.client_is_active(site)
    latencies: list[float] = []
    dispatched = 0
    dispatch_time = 0.0

    async def site_round(site: str) -> int:
        assignment = await tm.process_task_request(site)
        if assignment is None:
            return 0
        await tm.process_submission(site, assignment.task_id, assignment.client_task_id, {"n": 0})
        return 1

    for r in range(rounds):
        t0 = time.perf_counter()
        task_id = await tm.broadcast(Task("train", data={"round": r}), targets=sites, min_responses=0)
        handed = await asyncio.gather(*(site_round(s) for s in sites))
        outcome = await tm.wait(task_id)
        elapsed = time.perf_counter() - t0
        if outcome.status is not TaskCompletionStatus.OK or len(outcome.results) != n_sites:
            raise SystemExit(f"round {r} with {n_sites} sites ended {outcome.status}")
        latencies.append(elapsed * 1000)
        dispatched += sum(handed)
        dispatch_time += elapsed
    await tm.aclose()
    rt.close()
    rec.close()
    latencies.sort()
    return {
        "round_p50_ms": statistics.median(latencies),
        "round_p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        "dispatch_per_s": dispatched / dispatch_time,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, under a minute")
    parser.add_argument("--out", help="also write the JSON to this file")
    args = parser.parse_args()
    rounds = 10 if args.quick else 40
    workdir = Path(tempfile.mkdtemp(prefix="fedlog-rounds-"))
    result: dict[str, Any] = {"bench": "rounds", "quick": args.quick, "sites_as": "asyncio tasks in one process",
                              "transport": "none (task manager called directly)", "backend": "sqlite",
                              "rounds": rounds, "round_p50_ms": {}, "round_p99_ms": {}}
    try:
        for n in (8, 32, 128):
            print(f"[rounds] {n} sites", file=sys.stderr, flush=True)
            figures = asyncio.run(run_rounds(workdir, n, rounds))
            result["round_p50_ms"][n] = figures["round_p50_ms"]
            result["round_p99_ms"][n] = figures["round_p99_ms"]
            if n == 128:
                result["dispatch_per_s"] = figures["dispatch_per_s"]
        result["target_round_p50_ms_32"] = 50
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    text = json.dumps(result, indent=2, default=lambda v: round(v, 3) if isinstance(v, float) else str(v))
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
