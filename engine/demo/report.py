"""``fedlog demo`` for people: crash the driver a few times, show what each restart recovered.

``run_demo`` builds the plan, runs it once in memory (the uncrashed reference),
then drives the real log through the crash harness, printing progress and, for
every restart, what it found in the log: events, live machines, timers re-armed,
overdue timers fired at once. It ends by comparing the log with the reference.
"""

from __future__ import annotations

import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from engine.demo.driver import demo_charts
from engine.demo.harness import (
    Run,
    check_log,
    crash_runs,
    final_states,
    first_difference,
    histories,
    reference_log,
)
from engine.demo.plan import KIND, build_plan
from engine.errors import ConfigError
from engine.log.sql import open_recorder
from engine.log.target import describe, is_sqlite, to_url

__all__ = ["DemoOutcome", "default_db", "kill_points", "run_demo"]


@dataclass(frozen=True, slots=True)
class DemoOutcome:
    """How the demo ended: ``identical`` is the verdict, ``difference`` the first mismatch."""

    db: str
    runs: int
    kills: int
    events: int
    identical: bool
    difference: str | None


def default_db() -> str:
    """A fresh directory for the demo's log (printed, so it can be inspected afterwards)."""
    return str(Path(tempfile.mkdtemp(prefix="fedlog-demo-")) / "demo.db")


def kill_points(total_events: int, kills: int, rng: random.Random) -> list[int]:
    """``kills`` increasing thresholds spread over the log; the first may be 0 (kill at once)."""
    if kills <= 0 or total_events < 2:
        return []
    # one kill in the first tenth (often 0: before the process has done anything)
    points = {rng.choice([0, rng.randrange(1, max(2, total_events // 10))])}
    while len(points) < min(kills, total_events - 1):
        points.add(rng.randrange(1, total_events))
    return sorted(points)


class _Progress:
    """One status line, redrawn in place on a terminal, printed sparingly elsewhere."""

    def __init__(self, out: TextIO, total: int) -> None:
        self.out = out
        self.total = total
        self.tty = out.isatty()
        self._last = 0.0
        self._shown = False

    def poll(self, run: int, seq: int) -> None:
        now = time.monotonic()
        if not self.tty or now - self._last < 0.1:
            return
        self._last = now
        width = 30
        done = min(width, width * seq // max(1, self.total))
        self.out.write(f"\r  run {run}: [{'#' * done}{'.' * (width - done)}] {seq}/{self.total} events ")
        self.out.flush()
        self._shown = True

    def clear(self) -> None:
        if self._shown:
            self.out.write("\r" + " " * 72 + "\r")
            self._shown = False


def _describe_run(run: Run) -> str:
    lines = [f"  run {run.number} (pid {run.pid}):"]
    recovered = run.reports.get("recovered")
    if recovered is None:
        lines[0] += " killed before it had opened the log"
    elif recovered["events_in_log"] == 0:
        lines[0] += " fresh log"
    else:
        lines[0] += (f" recovered {recovered['events_in_log']} events, {recovered['machines']} machines "
                     f"({recovered['live_machines']} live), {recovered['timers_rearmed']} timers re-armed")
        overdue = recovered["overdue_timers"]
        resumed = run.reports.get("resumed")
        where = f"resumed at tick {recovered['tick']}"
        if recovered.get("done_at_tick") and (recovered.get("remaining_at_tick") or overdue):
            where += (f", part-way through it ({recovered['done_at_tick']} machines done with it, "
                      f"{recovered.get('remaining_at_tick', 0)} planned triggers to go)")
        if overdue:
            where += f"; {overdue} overdue timer(s)"
            if resumed is not None:
                fired = resumed["overdue_fired"]
                where += f": {fired} fired at once"
                if fired < overdue:
                    # a trigger planned for that same tick moved the machine first, as it did uncrashed
                    where += f", {overdue - fired} overtaken by a planned trigger"
        lines.append(f"      {where}")
    if run.killed and run.threshold == 0:
        lines.append(f"      SIGKILL right after it started (log at event {run.killed_at_seq})")
    elif run.killed:
        lines.append(f"      SIGKILL at event {run.killed_at_seq}")
    else:
        done = run.reports.get("done", {})
        lines.append(f"      finished at tick {done.get('last_tick', '?')} "
                     f"({done.get('appended', 0)} events appended by this run)")
    return "\n".join(lines)


def run_demo(
    db: str | None, machines: int, seed: int, kills: int, *, out: TextIO | None = None
) -> DemoOutcome:
    """Run the demo end to end, printing to ``out`` (default stdout); see the module docstring."""
    out = out or sys.stdout
    if machines < 1:
        raise ConfigError(f"--machines must be at least 1, got {machines}")
    if kills < 0:
        raise ConfigError(f"--kills cannot be negative, got {kills}")
    db = db or default_db()
    url = to_url(db)
    with open_recorder(db) as log:
        if log.last_seq() != 0:
            raise ConfigError(f"{describe(url)} already holds {log.last_seq()} events; the demo needs a fresh log")
    where = "SQLite file" if is_sqlite(url) else "PostgreSQL"
    print(f"fedlog demo: {machines} {KIND} machines, seed {seed}, {kills} SIGKILL(s)", file=out)
    print(f"  log: {describe(url)} ({where}, durable commits)", file=out)

    plan = build_plan(machines, seed)
    reference = reference_log(plan)
    total = reference.last_seq()
    print(f"  reference: the same plan in memory, never killed: {total} events, ticks 0..{plan.last_tick}", file=out)
    out.flush()

    progress = _Progress(out, total)

    def show(run: Run) -> None:
        progress.clear()
        print(_describe_run(run), file=out)
        out.flush()

    points = kill_points(total, kills, random.Random(f"fedlog-demo-kills:{seed}"))
    runs = crash_runs(db, plan, points, on_poll=progress.poll, on_run=show)
    with open_recorder(db) as log:
        difference = first_difference(histories(reference), histories(log))
        if difference is None and final_states(reference) != final_states(log):
            difference = "final states differ from the uncrashed run"
        problems = check_log(log, demo_charts())
        states = Counter(state for state, *_ in final_states(log).values())
        events = log.last_seq()
    killed = sum(1 for r in runs if r.killed)
    identical = difference is None and not problems
    if identical:
        print(f"identical: after {killed} SIGKILL(s) and {len(runs) - 1} restart(s), every machine's events "
              f"(trigger, source, dest, version, data, deadline, time) and final state match the uncrashed run "
              f"({machines} machines, {events} events)", file=out)
        print("  final states: " + ", ".join(f"{s} {n}" for s, n in states.most_common()), file=out)
        print("  log checks: projection == fold(events); every stored transition legal under its chart", file=out)
        shown = db if is_sqlite(url) else describe(url)  # never echo a password
        print("  look inside:", file=out)
        print(f"    fedlog replay {shown} --verify", file=out)
        print(f'    fedlog sql {shown} "SELECT state, count(*) FROM machines GROUP BY state"', file=out)
    else:
        print(f"DIFFERENT from the uncrashed run: {difference or problems[0]}", file=out)
        for problem in problems[1:10]:
            print(f"  {problem}", file=out)
    return DemoOutcome(db=db, runs=len(runs), kills=killed, events=events, identical=identical,
                       difference=difference or (problems[0] if problems else None))
