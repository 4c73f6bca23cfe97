"""Crash harness: run the demo driver as a child process, SIGKILL it, restart it, compare.

Kill points are chosen by watching the log grow, not by the clock: a run is killed
once the log's last sequence number reaches its threshold (threshold 0: the moment
the process exists, before it has imported anything). After the last kill the
driver runs to the end; the log is then compared, machine by machine and event by
event, with an uncrashed run of the same plan in memory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.charts.registry import ChartRegistry
from engine.demo.driver import drive
from engine.demo.plan import Plan
from engine.errors import EngineError
from engine.log.memory import MemoryRecorder
from engine.log.recorder import EventRecorder
from engine.log.sql import open_recorder
from engine.machines.state import CREATE_TRIGGER, MachineState, step

__all__ = [
    "History",
    "Run",
    "check_log",
    "crash_runs",
    "final_states",
    "first_difference",
    "histories",
    "reference_log",
]

#: per machine: (version, trigger, source, dest, data, deadline_us, ts_us, chart_version, writer)
History = dict[str, list[tuple[Any, ...]]]

_POLL_S = 0.001


@dataclass
class Run:
    """One driver process: how it started, what it reported, how it ended."""

    number: int
    pid: int
    threshold: int | None  # kill once last_seq >= threshold; None: let it finish
    killed_at_seq: int | None = None
    exit_code: int | None = None
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)
    stderr: str = ""

    @property
    def killed(self) -> bool:
        """True when this run ended by our SIGKILL."""
        return self.killed_at_seq is not None


def histories(recorder: EventRecorder) -> History:
    """Every machine's events, as the fields an uncrashed run must reproduce exactly."""
    out: History = {}
    for e in recorder.read():
        out.setdefault(e.machine_id, []).append(
            (e.version, e.trigger, e.source, e.dest, e.data, e.deadline_us, e.ts_us, e.chart_version, e.writer))
    return out


def final_states(recorder: EventRecorder) -> dict[str, tuple[str, int, bool, int | None]]:
    """Every machine's projected (state, version, terminal, deadline)."""
    return {r.machine_id: (r.state, r.version, r.terminal, r.deadline_us) for r in recorder.machines()}


def first_difference(expected: History, actual: History) -> str | None:
    """Describe the first machine/event where ``actual`` departs from ``expected``, or None."""
    for machine_id in sorted(set(expected) | set(actual)):
        want, got = expected.get(machine_id), actual.get(machine_id)
        if want is None or got is None:
            return f"machine {machine_id}: {'missing from the log' if got is None else 'not in the uncrashed run'}"
        for index in range(max(len(want), len(got))):
            w = want[index] if index < len(want) else None
            g = got[index] if index < len(got) else None
            if w != g:
                return f"machine {machine_id}, event {index + 1}: expected {w}, found {g}"
    return None


def check_log(recorder: EventRecorder, charts: ChartRegistry) -> list[str]:
    """Problems with the log itself: illegal transitions, version gaps, projection != fold."""
    problems: list[str] = []
    folded: dict[str, MachineState] = {}
    for e in recorder.read():
        chart = charts.get(e.kind, e.chart_version)
        before = folded.get(e.machine_id)
        if before is None:
            if (e.version, e.trigger, e.source, e.dest) != (1, CREATE_TRIGGER, None, chart.initial):
                problems.append(f"event {e.seq}: {e.machine_id} does not start with create into {chart.initial}")
        else:
            transition = chart.table.get((before.state, e.trigger))
            if e.version != before.version + 1:
                problems.append(f"event {e.seq}: {e.machine_id} version {e.version} after {before.version}")
            if e.source != before.state or transition is None or transition.dest != e.dest:
                problems.append(f"event {e.seq}: {e.machine_id} {e.trigger} {e.source}->{e.dest} "
                                f"is not legal from {before.state}")
        folded[e.machine_id] = step(before, e, chart.is_terminal(e.dest))
    projected = {r.machine_id: MachineState.from_row(r) for r in recorder.machines()}
    for machine_id in sorted(set(folded) | set(projected)):
        if folded.get(machine_id) != projected.get(machine_id):
            problems.append(f"{machine_id}: projection {projected.get(machine_id)} != fold {folded.get(machine_id)}")
    return problems


def reference_log(plan: Plan) -> MemoryRecorder:
    """The plan run in memory, never interrupted: what every crashed run must equal."""
    recorder = MemoryRecorder()
    drive(recorder, plan)
    return recorder


def _spawn(db: str, plan: Plan, out_dir: Path, number: int, extra: Iterable[str]) -> tuple[subprocess.Popen[bytes], Path, Path]:
    out = out_dir / f"run{number}.out"
    err = out_dir / f"run{number}.err"
    cmd = [sys.executable, "-m", "engine.demo", "--db", db, "--machines", str(plan.machines),
           "--seed", str(plan.seed), *extra]
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL)
    return proc, out, err


def _reports(path: Path) -> dict[str, dict[str, Any]]:
    reports: dict[str, dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue  # a line cut short by the kill
        if isinstance(item, dict) and "event" in item:
            reports[str(item.pop("event"))] = item
    return reports


def crash_runs(
    db: str,
    plan: Plan,
    thresholds: Iterable[int],
    *,
    on_poll: Callable[[int, int], None] | None = None,
    on_run: Callable[[Run], None] | None = None,
    run_timeout_s: float = 120.0,
    extra_args: Iterable[str] = (),
) -> list[Run]:
    """Start the driver on ``db``, SIGKILL it at each threshold, restart; let the last run finish.

    A threshold below the log's size when its run starts is raised to one more event
    than the log holds (the run must make progress before it is killed), except 0,
    which kills at once. ``on_poll(run_number, last_seq)`` is called while waiting.
    Raises ``EngineError`` if a run fails or stalls.
    """
    extra = list(extra_args)
    runs: list[Run] = []
    with open_recorder(db) as watcher, tempfile.TemporaryDirectory(prefix="fedlog-demo-runs-") as tmp:
        out_dir = Path(tmp)
        for number, threshold in enumerate([*thresholds, None], start=1):
            if threshold is not None and threshold > 0:
                threshold = max(threshold, watcher.last_seq() + 1)
            proc, out, err = _spawn(db, plan, out_dir, number, extra)
            run = Run(number, proc.pid, threshold)
            end = time.monotonic() + run_timeout_s
            while True:
                code = proc.poll()
                if code is not None:
                    run.exit_code = code
                    break
                seq = watcher.last_seq() if threshold != 0 else 0
                if threshold is not None and seq >= threshold:
                    os.kill(proc.pid, signal.SIGKILL)
                    run.exit_code = proc.wait()
                    run.killed_at_seq = watcher.last_seq()
                    break
                if time.monotonic() > end:
                    proc.kill()
                    proc.wait()
                    raise EngineError(f"demo driver run {number} made no end within {run_timeout_s}s "
                                      f"(log at seq {watcher.last_seq()})")
                if on_poll is not None:
                    on_poll(number, seq)
                time.sleep(_POLL_S)
            run.reports = _reports(out)
            run.stderr = err.read_text(encoding="utf-8", errors="replace")
            runs.append(run)
            if on_run is not None:
                on_run(run)
            if not run.killed and run.exit_code != 0:
                raise EngineError(f"demo driver run {number} failed with exit code {run.exit_code}:\n{run.stderr.strip()}")
    return runs

