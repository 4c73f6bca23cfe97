"""``replay --verify``: is every stored event legal, and does the projection tell the truth?

Each event is checked against the statechart *version it was written under* (an
event written under job v1 stays legal after job v2 ships), while the events are
folded with ``step`` exactly as ``fold`` does:

* the (kind, chart version) must be a loaded chart;
* a machine's first event is version 1, trigger ``create``, no source, and enters the
  chart's initial state;
* every later event is the previous version + 1 (no gap, no duplicate), starts from
  the folded current state, uses a (source, trigger) pair of the chart whose
  destination is the event's, keeps the machine's kind, and no event follows a
  terminal state;
* finally the folded states are compared with ``machine_states`` (state, version,
  terminal flag, deadline, chart version, job, round, site), and machines present on
  only one side are named.

Every problem is collected (each naming seq, machine, kind, what was expected and
what was found) rather than stopping at the first: a hand-edited log usually has
several, and the second is often the clue to the first.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select

from engine.charts.model import Chart
from engine.charts.registry import ChartRegistry
from engine.clock import format_us
from engine.errors import LogCorrupted
from engine.history.replay import EventView, Progress, Until, gc_paused, read_rows, stream_rows
from engine.log.recorder import EventRecorder
from engine.log.schema import machine_states
from engine.log.sql import SqlRecorder
from engine.machines.state import CREATE_TRIGGER, MachineState, step

__all__ = ["VERIFY_COLUMNS", "Problem", "VerifyReport", "verify_log"]

#: the event columns verification reads, in row order
VERIFY_COLUMNS: tuple[str, ...] = (
    "seq", "machine_id", "kind", "chart_version", "version", "trigger", "source", "dest",
    "deadline_us", "job_id", "round", "site",
)

#: projection fields compared with the fold, in report order
_COMPARED = ("kind", "chart_version", "state", "version", "terminal", "deadline_us", "job_id", "round", "site")


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with the log: where (seq, machine, kind, version) and what.

    ``seq`` is the offending event; it is None for a disagreement between the fold
    and the ``machine_states`` projection (the message then names the last event).
    """

    seq: int | None
    machine_id: str
    kind: str
    version: int | None
    message: str

    def __str__(self) -> str:
        where = f"seq {self.seq}" if self.seq is not None else "projection"
        version = f" v{self.version}" if self.version is not None else ""
        return f"{where}: {self.kind} {self.machine_id!r}{version}: {self.message}"


@dataclass
class VerifyReport:
    """What verification found: the folded states and every problem, in log order."""

    states: dict[str, MachineState] = field(default_factory=dict)
    events: int = 0
    last_seq: int = 0
    problems: list[Problem] = field(default_factory=list)
    #: False when the fold stopped early (``until``), so the projection was not compared
    projection_compared: bool = False

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems

    def raise_if_corrupted(self) -> None:
        """Raise ``LogCorrupted`` listing every problem, if there is any."""
        if self.problems:
            raise LogCorrupted([str(p) for p in self.problems])


def _show(value: Any, name: str = "") -> str:
    if name == "deadline_us":
        return "none" if value is None else f"{format_us(value)} ({value})"
    return repr(value)


class _Checker:
    """Checks one event at a time against its chart and the machine's folded state."""

    def __init__(self, charts: ChartRegistry, problems: list[Problem]) -> None:
        self.charts = charts
        self.problems = problems
        self.cache: dict[str, dict[int, Chart | None]] = {}
        # unknown charts are reported once per machine, not once per event
        self.unknown_reported: set[tuple[str, str, int]] = set()

    def chart(self, ev: EventView) -> Chart | None:
        versions = self.cache.get(ev.kind)
        if versions is None:
            versions = self.cache[ev.kind] = {}
        if ev.chart_version in versions:
            chart = versions[ev.chart_version]
        else:
            chart = versions[ev.chart_version] = self.charts.find(ev.kind, ev.chart_version)
        if chart is None and (ev.machine_id, ev.kind, ev.chart_version) not in self.unknown_reported:
            self.unknown_reported.add((ev.machine_id, ev.kind, ev.chart_version))
            if ev.kind in self.charts:
                known = ", ".join(str(v) for v in self._versions(ev.kind))
                what = f"loaded {ev.kind} chart versions: {known}"
            else:
                what = f"no {ev.kind!r} chart is loaded; loaded kinds: {', '.join(self.charts.kinds()) or 'none'}"
            self.add(ev, f"written under {ev.kind} chart version {ev.chart_version}, which is unknown "
                         f"({what}); its events cannot be checked")
        return chart

    def _versions(self, kind: str) -> list[int]:
        newest = self.charts.get(kind).version
        return [v for v in range(1, newest + 1) if self.charts.find(kind, v) is not None]

    def add(self, ev: EventView, message: str) -> None:
        self.problems.append(Problem(ev.seq, ev.machine_id, ev.kind, ev.version, message))

    def check(self, ev: EventView, current: MachineState | None, chart: Chart | None) -> None:
        if current is None:
            self._check_first(ev, chart)
            return
        if ev.kind != current.kind:
            self.add(ev, f"kind changed: the machine was created as {current.kind!r}, this event says {ev.kind!r}")
        expected = current.version + 1
        if ev.version < expected:
            self.add(ev, f"version {ev.version} again: expected version {expected} after version "
                         f"{current.version} (duplicate or out-of-order event)")
        elif ev.version > expected:
            missing = str(expected) if ev.version == expected + 1 else f"{expected}..{ev.version - 1}"
            self.add(ev, f"version gap: expected version {expected} after version {current.version}, "
                         f"found {ev.version} (version {missing} missing)")
        if current.terminal:
            self.add(ev, f"event after the terminal state {current.state!r} (reached at version "
                         f"{current.version}): a terminal machine takes no more events")
        if ev.source != current.state:
            self.add(ev, f"source state {ev.source!r} is not the machine's state: the events before "
                         f"it fold to {current.state!r} (version {current.version})")
        if ev.trigger == CREATE_TRIGGER:
            self.add(ev, f"{CREATE_TRIGGER!r} event for a machine that already exists (at version "
                         f"{current.version})")
        elif chart is not None:
            self._check_transition(ev, chart)

    def _check_first(self, ev: EventView, chart: Chart | None) -> None:
        if ev.version != 1:
            missing = "1" if ev.version == 2 else f"1..{ev.version - 1}"
            self.add(ev, f"first event of the machine has version {ev.version}, expected 1 "
                         f"(version {missing} missing)")
        if ev.version != 1 and ev.trigger != CREATE_TRIGGER:
            # the machine's earlier events are gone: check this one as a plain transition
            if chart is not None:
                self._check_transition(ev, chart)
            return
        if ev.trigger != CREATE_TRIGGER:
            self.add(ev, f"version 1 must be the {CREATE_TRIGGER!r} event, found trigger {ev.trigger!r}")
        if ev.source is not None:
            self.add(ev, f"the {CREATE_TRIGGER!r} event must have no source state, found {ev.source!r}")
        if chart is not None and ev.dest != chart.initial:
            self.add(ev, f"the {CREATE_TRIGGER!r} event must enter {ev.kind} v{chart.version}'s initial "
                         f"state {chart.initial!r}, found {ev.dest!r}")

    def _check_transition(self, ev: EventView, chart: Chart) -> None:
        name = f"{ev.kind} chart v{chart.version}"
        if ev.source is None:
            self.add(ev, f"trigger {ev.trigger!r} has no source state; only {CREATE_TRIGGER!r} may")
            return
        if ev.source not in chart.states:
            self.add(ev, f"source state {ev.source!r} is not a state of {name}")
            return
        transition = chart.table.get((ev.source, ev.trigger))
        if transition is None:
            legal = ", ".join(chart.legal.get(ev.source, ())) or "none (terminal state)"
            self.add(ev, f"trigger {ev.trigger!r} is not legal in state {ev.source!r} of {name} "
                         f"(legal there: {legal})")
        elif transition.dest != ev.dest:
            self.add(ev, f"trigger {ev.trigger!r} from {ev.source!r} leads to {transition.dest!r} "
                         f"in {name}, but the event enters {ev.dest!r}")
        elif ev.dest not in chart.states:  # pragma: no cover - a validated chart names only its states
            self.add(ev, f"destination {ev.dest!r} is not a state of {name}")


def verify_log(
    recorder: EventRecorder,
    charts: ChartRegistry,
    *,
    machine_id: str | None = None,
    until: Until | None = None,
    progress: Progress | None = None,
) -> VerifyReport:
    """Fold the log while checking every event; then compare the fold with the projection.

    Args:
        recorder: the log to check (nothing is written).
        charts: every chart version the log's events were written under.
        machine_id: check only this machine (and only its projection row).
        until: check events up to this seq or time; the projection, which holds
            the newest state, is then not compared.
        progress: called after every chunk of rows with (events checked, last seq).

    Returns:
        The report; ``report.raise_if_corrupted()`` turns problems into ``LogCorrupted``.
    """
    report = VerifyReport()
    rows = read_rows(recorder, VERIFY_COLUMNS, machine_id=machine_id, until=until)
    with closing(rows), gc_paused():
        last_seq_of = _check_events(report, rows, charts, progress)
    if until is None:
        report.projection_compared = True
        _compare_projection(report, _projection_rows(recorder, machine_id), last_seq_of)
    return report


def _check_events(
    report: VerifyReport, chunks: Iterator[Sequence[tuple[Any, ...]]],
    charts: ChartRegistry, progress: Progress | None,
) -> dict[str, int]:
    states = report.states
    get = states.get
    checker = _Checker(charts, report.problems)
    cache = checker.cache
    last_seq_of: dict[str, int] = {}
    view = EventView()
    event = view.as_event()
    count = 0
    for chunk in chunks:
        for row in chunk:
            (view.seq, view.machine_id, view.kind, view.chart_version, view.version, view.trigger,
             view.source, view.dest, view.deadline_us, view.job_id, view.round, view.site) = row
            current = get(view.machine_id)
            versions = cache.get(view.kind)
            chart = versions.get(view.chart_version) if versions is not None else None
            if chart is None:
                chart = checker.chart(view)
            # the common case inline; anything unusual goes through the full check, which
            # finds and words every problem
            if (
                current is None or chart is None or current.terminal
                or view.version != current.version + 1 or view.source != current.state
                or view.kind != current.kind
            ):
                checker.check(view, current, chart)
            else:
                transition = chart.table.get((current.state, view.trigger))
                if transition is None or transition.dest != view.dest:
                    checker.check(view, current, chart)
            # fold the event as stored, whatever was wrong with it: later events and the
            # projection are compared with what the log actually says
            states[view.machine_id] = step(current, event, chart is not None and chart.is_terminal(view.dest))
            last_seq_of[view.machine_id] = view.seq
        count += len(chunk)
        report.events = count
        report.last_seq = view.seq
        if progress is not None:
            progress(count, view.seq)
    return last_seq_of


def _projection_rows(recorder: EventRecorder, machine_id: str | None) -> Iterator[tuple[Any, ...]]:
    """``machine_states`` rows as tuples of ``machine_id`` and the ``_COMPARED`` fields."""
    if isinstance(recorder, SqlRecorder):
        ms = machine_states.c
        stmt = select(ms.machine_id, *(ms[name] for name in _COMPARED))
        if machine_id is not None:
            stmt = stmt.where(ms.machine_id == machine_id)
        for chunk in stream_rows(recorder, stmt):
            yield from chunk
        return
    if machine_id is None:
        rows = recorder.machines()
    else:
        found = recorder.get_machine(machine_id)
        rows = [found] if found is not None else []
    for row in rows:
        yield (row.machine_id, *(getattr(row, name) for name in _COMPARED))


def _compare_projection(
    report: VerifyReport, rows: Iterable[tuple[Any, ...]], last_seq_of: dict[str, int]
) -> None:
    states = report.states
    seen: set[str] = set()
    terminal_at = 1 + _COMPARED.index("terminal")
    for row in rows:
        mid = row[0]
        seen.add(mid)
        folded = states.get(mid)
        if folded is None:
            kind, version, state = row[1], row[1 + _COMPARED.index("version")], row[1 + _COMPARED.index("state")]
            report.problems.append(Problem(
                None, mid, kind, version,
                f"machine_states has this machine (state {state!r}, version {version}) "
                "but the log has no events for it"))
            continue
        # SQLite hands booleans back as 0/1
        stored = (*row[1:terminal_at], bool(row[terminal_at]), *row[terminal_at + 1:])
        rebuilt = tuple(getattr(folded, name) for name in _COMPARED)
        if stored == rebuilt:
            continue
        diffs = [
            f"{name}: machine_states has {_show(a, name)}, the events fold to {_show(b, name)}"
            for name, a, b in zip(_COMPARED, stored, rebuilt, strict=True) if a != b
        ]
        report.problems.append(Problem(
            None, mid, folded.kind, folded.version,
            f"machine_states disagrees with the events (last event: seq {last_seq_of[mid]}): "
            + "; ".join(diffs)))
    for mid, folded in states.items():
        if mid not in seen:
            report.problems.append(Problem(
                None, mid, folded.kind, folded.version,
                f"the events (last: seq {last_seq_of[mid]}) fold to state {folded.state!r} at version "
                f"{folded.version}, but machine_states has no row for this machine"))
