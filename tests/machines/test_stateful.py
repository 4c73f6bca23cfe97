"""Random trigger sequences, clock jumps and restarts never break the log's promises.

A hypothesis rule-based machine creates machines of two charts, fires legal and
illegal triggers with random data, moves a manual clock (running due timers) and,
on SQLite, closes and reopens the log and recovers. After every step:

* every machine's projection equals the fold of its events (``state.step``) and the
  runtime's view;
* every stored transition is legal under its chart, starting from ``create``;
* per-machine versions are 1, 2, 3, ... with no gap;
* no live machine holds a deadline that has passed (due timers all fired).

A rejected trigger must leave the whole log unchanged; an accepted one must append
exactly the event the chart describes.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from engine.charts.model import Chart
from engine.clock import ManualClock
from engine.config import Durability
from engine.errors import TransitionRejected
from engine.log.recorder import EventRecorder
from engine.log.sql import open_recorder
from engine.machines.runtime import Runtime
from engine.machines.state import CREATE_TRIGGER, MachineState
from tests.machines.support import GUARDS, US, fold, registry, snapshot

CHARTS = registry()
TRIGGERS = sorted({t.trigger for chart in CHARTS for t in chart.transitions} | {"bogus", CREATE_TRIGGER})

#: few machines, many steps each: long histories rather than many one-event machines
MAX_MACHINES = 4
#: reopening the log costs a schema check; a few restarts per example say what they must
MAX_RESTARTS = 2

DATA = st.fixed_dictionaries(
    {},
    optional={
        "ok": st.booleans(),
        "remaining": st.integers(0, 2),
        "wait_s": st.one_of(st.none(), st.integers(-1, 40), st.floats(0.25, 40)),
        "deploy_timeout": st.one_of(st.none(), st.integers(1, 40), st.floats(0.5, 40)),
    },
)


def expected_deadline(
    chart: Chart, before: MachineState, trigger: str, dest: str, data: Mapping[str, Any], now: int
) -> int | None:
    """The deadline the chart promises after a transition (written apart from the engine's)."""
    spec = chart.states[dest]
    if spec.terminal:
        return None
    timeout = spec.timeout
    if before.state == dest and (timeout is None or trigger != timeout.trigger):
        return before.deadline_us  # time in a state is not reset by staying in it
    if timeout is None:
        return None
    seconds: Any = timeout.seconds
    if timeout.from_data is not None and timeout.from_data in data:
        seconds = data[timeout.from_data]
    if not isinstance(seconds, int | float) or isinstance(seconds, bool) or seconds <= 0:
        return None
    return now + round(seconds * US)


class RuntimeRules(RuleBasedStateMachine):
    """The rules; ``backend`` and ``base`` are set by the test that runs it."""

    backend = "memory"
    base: Path | None = None
    _counter = itertools.count()

    machines = Bundle("machines")

    def __init__(self) -> None:
        super().__init__()
        self.clock = ManualClock()
        self.target = "memory"
        if self.backend == "sqlite":
            assert self.base is not None
            self.target = str(self.base / f"run{next(self._counter)}.db")
        self.log: EventRecorder = self._open()
        self.rt = self._runtime()
        self.count = 0
        self.restarts = 0

    def _open(self) -> EventRecorder:
        # fsync buys nothing here (no power is cut); what is checked is the log's logic
        return open_recorder(self.target, durability=Durability.OFF)

    def _runtime(self) -> Runtime:
        return Runtime(self.log, CHARTS, clock=self.clock, writer="hyp", guards=GUARDS, run_timers=False)

    @initialize(target=machines)
    def first(self) -> str:
        return self._create("probe")

    @precondition(lambda self: self.count < MAX_MACHINES)
    @rule(target=machines, kind=st.sampled_from(["probe", "job"]))
    def create(self, kind: str) -> str:
        return self._create(kind)

    def _create(self, kind: str) -> str:
        self.count += 1
        machine_id = f"m{self.count}"
        state = self.rt.create(kind, machine_id=machine_id)
        assert (state.state, state.version) == (CHARTS.get(kind).initial, 1)
        return machine_id

    @rule(machine_id=machines, pick=st.data())
    def fire(self, machine_id: str, pick: st.DataObject) -> None:
        # a burst of triggers on one machine, with small clock moves between them: long
        # histories per example (self-transitions after time passed, guarded loops)
        for _ in range(pick.draw(st.integers(1, 6), label="burst")):
            seconds = pick.draw(st.sampled_from([0, 0, 0.5, 1, 3]), label="pause")
            if seconds:
                self.advance(seconds)
            self._fire_one(machine_id, pick)

    def _fire_one(self, machine_id: str, pick: st.DataObject) -> None:
        before = self.rt.get(machine_id)
        chart = CHARTS.get(before.kind)
        # mostly triggers legal here (guards may still refuse), favouring those that keep
        # the machine alive; else any trigger at all: long runs and plenty of rejections
        legal_here = list(chart.legal[before.state])
        alive = [t for t in legal_here if not chart.is_terminal(chart.table[(before.state, t)].dest)]
        options = [st.sampled_from(TRIGGERS)]
        if legal_here:
            options.append(st.sampled_from(legal_here))
        if alive:
            options.append(st.sampled_from(alive))
        choices = st.one_of(*options)
        trigger = pick.draw(choices, label="trigger")
        data = pick.draw(DATA, label="data")
        transition = chart.table.get((before.state, trigger))
        legal = transition is not None and (transition.guard is None or GUARDS[transition.guard](before, data))
        log_before = snapshot(self.log)
        try:
            after = self.rt.fire(machine_id, trigger, data)
        except TransitionRejected as exc:
            assert not legal, f"{trigger} from {before.state} is legal but was rejected: {exc}"
            assert (exc.machine_id, exc.state, exc.trigger) == (machine_id, before.state, trigger)
            assert exc.legal == list(chart.legal[before.state])
            assert snapshot(self.log) == log_before
            assert self.rt.get(machine_id) == before
            return
        assert legal and transition is not None, f"{trigger} from {before.state} was accepted"
        now = self.clock.now_us()
        event = list(self.log.read(after_seq=log_before[0]))
        assert len(event) == 1
        (e,) = event
        assert (e.machine_id, e.trigger, e.source, e.dest, e.version) == (
            machine_id, trigger, before.state, transition.dest, before.version + 1)
        assert (e.ts_us, e.data) == (now, data or None)
        assert e.deadline_us == expected_deadline(chart, before, trigger, transition.dest, data, now)
        assert after.deadline_us == e.deadline_us

    @rule(seconds=st.sampled_from([0.25, 1, 2, 2.5, 5, 10, 31, 45]))
    def wait(self, seconds: float) -> None:
        self.advance(seconds)

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        now = self.clock.now_us()
        due = {m for d, m, _ in self.log.timers() if d <= now}
        seq = self.log.last_seq()
        fired = self.rt.run_due_timers()
        assert fired == len(due)
        new = list(self.log.read(after_seq=seq))
        assert {e.machine_id for e in new} == due
        for e in new:
            chart = CHARTS.get(e.kind)
            timeout = chart.states[e.source].timeout if e.source else None
            assert timeout is not None and e.trigger == timeout.trigger and e.ts_us == now

    @precondition(lambda self: self.backend == "sqlite" and self.restarts < MAX_RESTARTS)
    @rule()
    def restart(self) -> None:
        self.rt.close()
        self.log.close()
        self.log = self._open()
        self.rt = self._runtime()
        report = self.rt.recover()
        timers = self.log.timers()
        assert report.timers_armed == len(timers)
        assert report.overdue_timers == 0  # timers ran before the restart
        assert report.last_seq == self.log.last_seq()
        self.restarts += 1

    @invariant()
    def projection_is_the_fold_of_events(self) -> None:
        folded = fold(self.log, CHARTS)
        rows = {r.machine_id: MachineState.from_row(r) for r in self.log.machines()}
        assert rows == folded
        for machine_id, state in folded.items():
            assert self.rt.get(machine_id) == state

    @invariant()
    def every_stored_transition_is_legal_and_versions_have_no_gaps(self) -> None:
        last: dict[str, tuple[int, str]] = {}
        for e in self.log.read():
            chart = CHARTS.get(e.kind, e.chart_version)
            if e.machine_id not in last:
                assert (e.version, e.trigger, e.source, e.dest) == (1, CREATE_TRIGGER, None, chart.initial)
            else:
                version, state = last[e.machine_id]
                assert e.version == version + 1
                assert e.source == state
                transition = chart.table.get((state, e.trigger))
                assert transition is not None and transition.dest == e.dest
            last[e.machine_id] = (e.version, e.dest)

    @invariant()
    def no_live_machine_is_past_its_deadline(self) -> None:
        now = self.clock.now_us()
        assert all(d > now for d, _, _ in self.log.timers())

    def teardown(self) -> None:
        self.rt.close()
        self.log.close()


@pytest.mark.parametrize(("backend", "examples"), [("memory", 60), ("sqlite", 20)])
def test_random_trigger_sequences_keep_the_log_consistent(backend: str, examples: int, tmp_path: Path) -> None:
    rules = type(f"RuntimeRules_{backend}", (RuntimeRules,), {"backend": backend, "base": tmp_path})
    run_state_machine_as_test(
        rules,
        settings=settings(
            max_examples=examples,
            stateful_step_count=40,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
