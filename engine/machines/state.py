"""A machine's state and the two pure functions every code path shares.

``plan`` turns (chart, current state, trigger, data, now) into the event to append,
or raises ``TransitionRejected``; ``step`` folds one event onto a state. Live firing,
recovery and replay all go through these two, so a replay reproduces exactly what the
live run computed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from engine.charts.model import Chart
from engine.errors import GuardRejected, TransitionRejected
from engine.log.recorder import MachineRow, NewEvent, StoredEvent
from engine.machines.data import check_event_data

__all__ = ["CREATE_TRIGGER", "Guard", "MachineState", "deadline_for", "plan", "plan_create", "step"]

#: trigger of every machine's first event (version 1: no source, dest = the chart's initial state)
CREATE_TRIGGER = "create"

US_PER_S = 1_000_000

Guard = Callable[["MachineState", Mapping[str, Any]], bool]


class MachineState(NamedTuple):
    """Where one machine is: its chart state, version and armed deadline.

    A named tuple rather than a frozen dataclass: it is immutable all the same, and
    building one is several times cheaper, which is most of a replay's cost per event.
    """

    machine_id: str
    kind: str
    chart_version: int
    state: str
    version: int
    terminal: bool
    deadline_us: int | None = None
    job_id: str | None = None
    round: int | None = None
    site: str | None = None

    @classmethod
    def from_row(cls, row: MachineRow) -> MachineState:
        """The state a projection row describes (restoring runs no callbacks)."""
        return cls(row.machine_id, row.kind, row.chart_version, row.state, row.version,
                   bool(row.terminal), row.deadline_us, row.job_id, row.round, row.site)


def deadline_for(
    chart: Chart, source: str | None, dest: str, data: Mapping[str, Any] | None,
    now_us: int, previous_deadline: int | None, explicit: int | None, trigger: str | None = None,
) -> int | None:
    """The absolute deadline a machine has after entering ``dest``.

    An explicit deadline wins. A self-transition keeps the armed deadline (time in
    a state is not reset by events that do not leave it), unless the self-transition
    is the state's own timeout firing, which re-arms it. Otherwise the state's
    timeout decides: a ``from_data`` key present in the data gives the seconds (a
    null or non-positive value arms no timer), else the fixed ``after`` seconds.
    """
    if explicit is not None:
        return explicit
    spec = chart.states[dest]
    if spec.terminal:
        return None
    timeout = spec.timeout
    if source == dest and not (timeout is not None and trigger == timeout.trigger):
        return previous_deadline
    if timeout is None:
        return None
    seconds: Any = timeout.seconds
    if timeout.from_data is not None and data is not None and timeout.from_data in data:
        seconds = data[timeout.from_data]
    if seconds is None or isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds <= 0:
        return None
    return now_us + round(seconds * US_PER_S)


def plan_create(
    chart: Chart, machine_id: str, *, data: Mapping[str, Any] | None, now_us: int, writer: str,
    job_id: str | None, round: int | None, site: str | None, deadline_us: int | None,
) -> NewEvent:
    """The first event of a new machine: version 1, into the chart's initial state."""
    dest = chart.initial
    if data:
        check_event_data(data, machine_id, CREATE_TRIGGER)
    return NewEvent(
        machine_id=machine_id, kind=chart.name, chart_version=chart.version, version=1,
        trigger=CREATE_TRIGGER, source=None, dest=dest, terminal=chart.states[dest].terminal,
        ts_us=now_us, writer=writer, data=dict(data) if data else None,
        deadline_us=deadline_for(chart, None, dest, data, now_us, None, deadline_us),
        job_id=job_id, round=round, site=site,
    )


def plan(
    chart: Chart, current: MachineState, trigger: str, *, data: Mapping[str, Any] | None,
    now_us: int, writer: str, guards: Mapping[str, Guard], deadline_us: int | None = None,
    round: int | None = None,
) -> NewEvent:
    """The event that firing ``trigger`` appends, or ``TransitionRejected`` (nothing appended)."""
    transition = chart.table.get((current.state, trigger))
    if transition is None:
        raise TransitionRejected(current.machine_id, current.kind, current.state, trigger,
                                 chart.legal.get(current.state, ()))
    if transition.guard is not None:
        guard = guards.get(transition.guard)
        if guard is None:
            raise GuardRejected(current.machine_id, current.kind, current.state, trigger,
                                f"{transition.guard} (not registered)", chart.legal.get(current.state, ()))
        if not guard(current, data or {}):
            raise GuardRejected(current.machine_id, current.kind, current.state, trigger,
                                transition.guard, chart.legal.get(current.state, ()))
    dest = transition.dest
    if data:
        check_event_data(data, current.machine_id, trigger)
    # positional: this runs once per transition on the hot path
    return NewEvent(
        current.machine_id, current.kind, chart.version, current.version + 1, trigger,
        current.state, dest, chart.states[dest].terminal, now_us, writer,
        dict(data) if data else None,
        deadline_for(chart, current.state, dest, data, now_us, current.deadline_us, deadline_us, trigger),
        current.job_id, round if round is not None else current.round, current.site,
    )


def step(current: MachineState | None, event: NewEvent | StoredEvent, terminal: bool) -> MachineState:
    """Fold one event onto a state (``current`` None for a machine's first event)."""
    if current is None:
        return MachineState(event.machine_id, event.kind, event.chart_version, event.dest, event.version,
                            terminal, event.deadline_us, event.job_id, event.round, event.site)
    # job and site are fixed when the machine is created (as in the projection);
    # the round moves with the events that name one
    return MachineState(
        event.machine_id, current.kind, event.chart_version, event.dest, event.version, terminal,
        event.deadline_us, current.job_id,
        event.round if event.round is not None else current.round,
        current.site,
    )
