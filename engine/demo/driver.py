"""The demo's driver: runs a seeded plan against a log, resumable at any instant.

The driver owns a logical clock. Tick ``t`` is ``plan.time_us(t)``; at each tick it
first applies every action planned for that tick (concurrently, so the group
committer batches them), then fires the timers due at that time. Ticks run one after
another, so when the log's newest event belongs to tick ``T`` every earlier tick is
complete, and of tick ``T`` itself exactly the machines whose last event is at ``T``
are done with it: a machine has at most one planned action per tick, and timers run
only after every action of the tick.

Restarting after a SIGKILL therefore needs nothing but the log: read the projection,
set the clock to the last tick, ``recover()`` the runtime (timers re-armed from the
projection), skip the actions of machines already at that tick, and go on. Every
event gets the same trigger, source, dest, version, data, deadline and timestamp as
in a run that was never interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from engine.charts.loader import load_chart
from engine.charts.registry import ChartRegistry
from engine.clock import ManualClock
from engine.demo.plan import KIND, Action, Plan, build_plan
from engine.errors import EngineError, LeaseHeld, TransitionRejected
from engine.log.recorder import EventRecorder, StoredEvent
from engine.log.sql import open_recorder
from engine.machines.runtime import Runtime
from engine.machines.state import CREATE_TRIGGER
from engine.resources import data_dir

__all__ = ["WRITER", "DriveResult", "Resumed", "demo_charts", "drive", "main"]

logger = logging.getLogger(__name__)

#: the writer recorded in every event and named by the writer lease
WRITER = "fedlog-demo"


@dataclass(frozen=True, slots=True)
class Resumed:
    """What a (re)started driver found in the log before it went on."""

    tick: int
    events_in_log: int
    machines: int
    live_machines: int
    timers_rearmed: int
    overdue_timers: int
    #: machines already done with the resumed tick, and planned actions of it still to apply
    done_at_tick: int = 0
    remaining_at_tick: int = 0

    @property
    def mid_tick(self) -> bool:
        """True when the previous run stopped inside a tick, with part of it done."""
        return self.done_at_tick > 0 and (self.remaining_at_tick > 0 or self.overdue_timers > 0)


@dataclass(frozen=True, slots=True)
class DriveResult:
    """What one driver process did, from its start to the end of the plan."""

    resumed: Resumed
    overdue_fired: int
    appended: int
    rejected: int
    timers_fired: int
    last_tick: int


def demo_charts() -> ChartRegistry:
    """The shipped ``job`` chart, the only one the demo drives."""
    return ChartRegistry([load_chart(data_dir("statecharts") / f"{KIND}.yaml")])


def _check_log_is_ours(recorder: EventRecorder, plan: Plan) -> None:
    first = next(recorder.read(limit=1), None)
    if first is None:
        return
    seed = (first.data or {}).get("demo_seed")
    if first.kind != KIND or seed != plan.seed:
        raise EngineError(
            f"the log at {recorder.target} was not written by a demo with seed {plan.seed} "
            f"(its first event: {first.kind} {first.machine_id}, seed {seed}); give the demo a fresh log"
        )


def drive(
    recorder: EventRecorder,
    plan: Plan,
    *,
    charts: ChartRegistry | None = None,
    concurrency: int = 16,
    on_resumed: Callable[[Resumed], None] | None = None,
    on_first_tick: Callable[[int], None] | None = None,
) -> DriveResult:
    """Run ``plan`` against ``recorder`` from wherever its log stopped, to the end.

    ``on_resumed`` is called once the runtime has recovered, ``on_first_tick`` with
    the number of overdue timers fired when the resumed tick's timers have run.
    """
    _check_log_is_ours(recorder, plan)
    rows = recorder.machines()
    events_in_log = recorder.last_seq()
    planned = set(plan.machine_ids())
    strangers = sorted(r.machine_id for r in rows if r.machine_id not in planned)
    if strangers:
        raise EngineError(f"the log at {recorder.target} holds machines this plan never made: {strangers[:3]}")
    tick = plan.tick_of(max(r.updated_us for r in rows)) if rows else 0
    done_at_tick = {r.machine_id for r in rows if r.updated_us == plan.time_us(tick)}

    clock = ManualClock(start_us=plan.time_us(tick))
    runtime = Runtime(recorder, charts or demo_charts(), clock=clock, writer=WRITER, run_timers=False)
    try:
        report = runtime.recover()
        overdue = {m for d, m, _ in recorder.timers() if d <= clock.now_us()}
        resumed = Resumed(
            tick=tick, events_in_log=events_in_log, machines=len(rows),
            live_machines=sum(1 for r in rows if not r.terminal),
            timers_rearmed=report.timers_armed, overdue_timers=report.overdue_timers,
            done_at_tick=len(done_at_tick) if events_in_log else 0,
            remaining_at_tick=sum(1 for a in plan.at(tick) if a.machine_id not in done_at_tick),
        )
        if on_resumed is not None:
            on_resumed(resumed)
        counts = asyncio.run(_run(runtime, clock, plan, tick, done_at_tick, concurrency,
                                  overdue, events_in_log, on_first_tick))
    finally:
        runtime.close()
    overdue_fired, appended, rejected, timers_fired, last_tick = counts
    return DriveResult(resumed, overdue_fired, appended, rejected, timers_fired, last_tick)


async def _run(
    runtime: Runtime, clock: ManualClock, plan: Plan, tick: int, done_at_tick: set[str],
    concurrency: int, overdue: set[str], seq_at_start: int, on_first_tick: Callable[[int], None] | None,
) -> tuple[int, int, int, int, int]:
    gate = asyncio.Semaphore(concurrency)
    first = tick
    overdue_fired = appended = rejected = timers_fired = 0
    while tick <= plan.last_tick or runtime.next_deadline() is not None:
        clock.set(plan.time_us(tick))
        actions = plan.at(tick)
        if tick == first:
            actions = tuple(a for a in actions if a.machine_id not in done_at_tick)
        results = await asyncio.gather(*(_apply(runtime, plan, a, gate) for a in actions), return_exceptions=True)
        for result in results:
            if isinstance(result, TransitionRejected):
                rejected += 1  # planned on purpose, or the machine timed out first
            elif isinstance(result, BaseException):
                raise result
            else:
                appended += 1
        fired = runtime.run_due_timers()
        timers_fired += fired
        appended += fired
        if tick == first:
            overdue_fired = sum(
                1 for e in runtime.recorder.read(after_seq=seq_at_start)
                if e.machine_id in overdue and _is_timeout(runtime, e)
            )
            if on_first_tick is not None:
                on_first_tick(overdue_fired)
        tick += 1
    return overdue_fired, appended, rejected, timers_fired, tick - 1


def _is_timeout(runtime: Runtime, event: StoredEvent) -> bool:
    if event.source is None:
        return False
    timeout = runtime.charts.get(event.kind, event.chart_version).states[event.source].timeout
    return timeout is not None and timeout.trigger == event.trigger


async def _apply(runtime: Runtime, plan: Plan, action: Action, gate: asyncio.Semaphore) -> None:
    async with gate:
        if action.trigger == CREATE_TRIGGER:
            data = {**(action.data or {}), "demo_seed": plan.seed}
            await runtime.create_async(KIND, machine_id=action.machine_id, data=data, job_id=action.machine_id)
        else:
            await runtime.fire_async(action.machine_id, action.trigger, action.data)


def _open_with_lease(db: str, holder: str, wait_s: float) -> EventRecorder:
    # A killed driver's lease ends with its process (SQLite) or its session (PostgreSQL,
    # which may notice the dead connection a moment later): wait for it, within reason.
    end = time.monotonic() + wait_s
    while True:
        try:
            return open_recorder(db, lease_holder=holder)
        except LeaseHeld:
            if time.monotonic() >= end:
                raise
            time.sleep(0.05)


def _emit(kind: str, **fields: Any) -> None:
    print(json.dumps({"event": kind, **fields}), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the driver process (``python -m engine.demo``); prints JSON lines."""
    parser = argparse.ArgumentParser(prog="python -m engine.demo", description="The fedlog demo's driver process.")
    parser.add_argument("--db", required=True, help="SQLite path or SQLAlchemy URL of the log")
    parser.add_argument("--machines", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=16, help="planned triggers in flight at once")
    parser.add_argument("--lease-wait", type=float, default=10.0,
                        help="seconds to wait for a dead driver's writer lease to be released")
    args = parser.parse_args(argv)
    plan = build_plan(args.machines, args.seed)
    try:
        recorder = _open_with_lease(args.db, f"{WRITER} driver (seed {args.seed})", args.lease_wait)
    except LeaseHeld as exc:
        print(f"demo driver: {exc}", file=sys.stderr)
        return 3
    except EngineError as exc:
        print(f"demo driver: {exc}", file=sys.stderr)
        return 2
    try:
        result = drive(
            recorder, plan, concurrency=args.concurrency,
            on_resumed=lambda r: _emit("recovered", **asdict(r)),
            on_first_tick=lambda n: _emit("resumed", overdue_fired=n),
        )
    except EngineError as exc:
        print(f"demo driver: {exc}", file=sys.stderr)
        return 2
    finally:
        recorder.close()
    _emit("done", appended=result.appended, rejected=result.rejected,
          timers_fired=result.timers_fired, last_tick=result.last_tick)
    return 0
