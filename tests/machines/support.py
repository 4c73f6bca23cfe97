"""Shared pieces of the machine-runtime tests: a test chart, a registry, log snapshots.

The ``probe`` chart exercises what the shipped charts may not: a loop back to an
earlier state, guards, a fixed timeout, a timeout taken from the event data, a
self-transition that keeps the deadline and a timeout whose transition re-enters
its own state (which re-arms it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from engine.charts.loader import load_chart, parse_chart
from engine.charts.model import Chart
from engine.charts.registry import ChartRegistry
from engine.log.recorder import EventRecorder, MachineRow, StoredEvent
from engine.machines.state import MachineState, step
from engine.resources import data_dir

PROBE_YAML = """\
name: probe
version: 1
description: test chart
initial: idle
states:
  idle:
    description: waiting for work
  working:
    timeout: 10
  waiting:
    timeout: {from_data: wait_s, after: 30, trigger: expire}
  beating:
    timeout: {after: 2, trigger: beat}
  done:
    terminal: true
  lost:
    terminal: true
transitions:
  - {trigger: start, source: idle, dest: working}
  - {trigger: progress, source: working, dest: working}
  - {trigger: timeout, source: working, dest: lost}
  - {trigger: pause, source: working, dest: waiting}
  - {trigger: resume, source: waiting, dest: working, guard: may_resume}
  - {trigger: expire, source: waiting, dest: lost}
  - {trigger: finish, source: working, dest: idle}
  - {trigger: retire, source: idle, dest: done, guard: all_done}
  - {trigger: watch, source: idle, dest: beating}
  - {trigger: beat, source: beating, dest: beating}
  - {trigger: stop, source: beating, dest: idle}
  - {trigger: kill, source: "*", dest: lost}
"""

US = 1_000_000


def probe_chart() -> Chart:
    """The test chart described in the module docstring."""
    return parse_chart(PROBE_YAML, "probe.yaml")


def job_chart() -> Chart:
    """The shipped ``job`` chart alone (other shipped charts may be mid-edit)."""
    return load_chart(data_dir("statecharts") / "job.yaml")


def registry() -> ChartRegistry:
    """``probe`` and ``job``."""
    return ChartRegistry([probe_chart(), job_chart()])


def may_resume(_state: MachineState, data: Mapping[str, Any]) -> bool:
    """Guard of ``resume``: the caller says the work may go on."""
    return data.get("ok") is True


def all_done(_state: MachineState, data: Mapping[str, Any]) -> bool:
    """Guard of ``retire``: nothing is left to do."""
    return bool(data.get("remaining", 0) == 0)


GUARDS = {"may_resume": may_resume, "all_done": all_done}


def snapshot(recorder: EventRecorder) -> tuple[int, list[StoredEvent], list[MachineRow]]:
    """Everything the log holds, to show that a rejected call changed nothing."""
    rows = sorted(recorder.machines(), key=lambda r: r.machine_id)
    return recorder.last_seq(), list(recorder.read()), rows


def fold(recorder: EventRecorder, charts: ChartRegistry) -> dict[str, MachineState]:
    """Every machine's state rebuilt from its events alone."""
    out: dict[str, MachineState] = {}
    for event in recorder.read():
        chart = charts.get(event.kind, event.chart_version)
        out[event.machine_id] = step(out.get(event.machine_id), event, chart.is_terminal(event.dest))
    return out


def as_state(row: MachineRow) -> MachineState:
    """The projection row as a state, for comparing with a fold."""
    return MachineState.from_row(row)

