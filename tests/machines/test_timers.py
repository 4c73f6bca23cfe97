"""Timers: deadlines stored in events, fired by the scheduler, re-armed after a restart."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.clock import ManualClock
from engine.log.recorder import EventRecorder
from engine.log.sql import open_recorder
from engine.machines.runtime import Runtime
from engine.machines.state import MachineState
from tests.machines.support import GUARDS, US, registry


@pytest.fixture
def log(backend_url: str) -> Iterator[EventRecorder]:
    """A fresh event log on each backend."""
    recorder = open_recorder(backend_url)
    yield recorder
    recorder.close()


@pytest.fixture
def rt(log: EventRecorder, clock: ManualClock) -> Iterator[Runtime]:
    """A runtime whose timers fire only through ``run_due_timers``."""
    runtime = Runtime(log, registry(), clock=clock, guards=GUARDS, run_timers=False)
    yield runtime
    runtime.close()


def wait_until(condition: Callable[[], bool], what: str, limit_s: float = 10.0) -> None:
    """Poll a real condition until it holds; fail naming it after ``limit_s`` seconds."""
    end = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > end:
            pytest.fail(f"timed out after {limit_s}s waiting for {what}")
        time.sleep(0.005)


def test_deadline_is_stored_in_the_event_and_the_projection(rt: Runtime, log: EventRecorder, clock: ManualClock) -> None:
    rt.create("probe", machine_id="m1")
    t0 = clock.now_us()
    state = rt.fire("m1", "start")
    assert state.deadline_us == t0 + 10 * US
    event = list(log.read(machine_id="m1"))[-1]
    assert event.deadline_us == t0 + 10 * US
    row = log.get_machine("m1")
    assert row is not None and row.deadline_us == t0 + 10 * US
    assert log.timers() == [(t0 + 10 * US, "m1", 2)]
    assert rt.next_deadline() == t0 + 10 * US


def test_from_data_timeout_uses_the_data_else_the_default(rt: Runtime, clock: ManualClock) -> None:
    t0 = clock.now_us()
    cases: list[tuple[str, dict[str, Any], int | None]] = [
        ("given", {"wait_s": 2.5}, t0 + 2_500_000),
        ("default", {}, t0 + 30 * US),
        ("disabled", {"wait_s": None}, None),
        ("zero", {"wait_s": 0}, None),
    ]
    for name, data, expected in cases:
        rt.create("probe", machine_id=name)
        rt.fire(name, "start")
        assert rt.fire(name, "pause", data).deadline_us == expected, name


def test_job_deploy_timeout_from_data(log: EventRecorder, clock: ManualClock) -> None:
    with Runtime(log, registry(), clock=clock, run_timers=False) as runtime:
        runtime.create("job", machine_id="j")
        deploying = runtime.fire("j", "deploy", {"deploy_timeout": 7})
        assert deploying.deadline_us == clock.now_us() + 7 * US
        clock.advance(7)
        assert runtime.run_due_timers() == 1
        event = list(log.read(machine_id="j"))[-1]
        assert (event.trigger, event.source, event.dest) == ("timeout", "deploying", "failed")
        assert event.data == {"deadline_us": deploying.deadline_us}
        assert runtime.get("j").terminal and log.timers() == []


def test_timer_fires_at_the_deadline_inclusive_and_not_before(rt: Runtime, log: EventRecorder, clock: ManualClock) -> None:
    rt.create("probe", machine_id="m1")
    deadline = rt.fire("m1", "start").deadline_us
    assert deadline is not None
    assert rt.run_due_timers(deadline - 1) == 0
    clock.set(deadline - 1)
    assert rt.run_due_timers() == 0
    assert rt.get("m1").state == "working"
    clock.set(deadline)
    assert rt.run_due_timers() == 1
    last = list(log.read(machine_id="m1"))[-1]
    assert (last.trigger, last.source, last.dest, last.ts_us) == ("timeout", "working", "lost", deadline)
    assert rt.run_due_timers() == 0  # fired once, never again
    assert rt.next_deadline() is None


def test_overdue_timers_fire_in_deadline_order_when_time_jumps(rt: Runtime, log: EventRecorder, clock: ManualClock) -> None:
    for name, wait_s in (("slow", 9), ("fast", 1), ("mid", 4)):
        rt.create("probe", machine_id=name)
        rt.fire(name, "start")
        rt.fire(name, "pause", {"wait_s": wait_s})
    clock.advance(100)
    assert rt.run_due_timers() == 3
    expiries = [e.machine_id for e in log.read() if e.trigger == "expire"]
    assert expiries == ["fast", "mid", "slow"]


def test_a_machine_that_moved_on_makes_its_timer_stale(rt: Runtime, log: EventRecorder, clock: ManualClock) -> None:
    rt.create("probe", machine_id="m1")
    first = rt.fire("m1", "start").deadline_us
    assert first is not None
    clock.advance(1)
    rt.fire("m1", "finish")          # leaves working: no deadline
    assert rt.get("m1").deadline_us is None
    clock.advance(1)
    second = rt.fire("m1", "start").deadline_us  # a new deadline, later than the first
    assert second is not None and second > first
    seq = log.last_seq()
    clock.set(first)
    assert rt.run_due_timers() == 0  # the first timer is stale
    assert log.last_seq() == seq
    clock.set(second)
    assert rt.run_due_timers() == 1
    assert rt.get("m1").state == "lost"


def test_self_transition_keeps_the_deadline(rt: Runtime, clock: ManualClock) -> None:
    rt.create("probe", machine_id="m1")
    deadline = rt.fire("m1", "start").deadline_us
    for _ in range(3):
        clock.advance(3)
        assert rt.fire("m1", "progress").deadline_us == deadline
    assert deadline is not None
    clock.set(deadline)
    assert rt.run_due_timers() == 1
    assert rt.get("m1").state == "lost"


def test_timeout_that_reenters_its_state_rearms_it(rt: Runtime, log: EventRecorder, clock: ManualClock) -> None:
    rt.create("probe", machine_id="m1")
    t0 = clock.now_us()
    assert rt.fire("m1", "watch").deadline_us == t0 + 2 * US
    clock.advance(2)
    assert rt.run_due_timers() == 1
    assert rt.get("m1").deadline_us == t0 + 4 * US
    clock.advance(2.5)  # past the second deadline: fires once, re-armed from now
    assert rt.run_due_timers() == 1
    assert rt.get("m1").deadline_us == t0 + 4_500_000 + 2 * US
    assert [e.trigger for e in log.read(machine_id="m1")] == ["create", "watch", "beat", "beat"]
    rt.fire("m1", "stop")
    clock.advance(10)
    assert rt.run_due_timers() == 0


def test_timer_thread_fires_when_the_manual_clock_moves(log: EventRecorder, clock: ManualClock) -> None:
    with Runtime(log, registry(), clock=clock, run_timers=True) as runtime:
        runtime.create("probe", machine_id="m1")
        runtime.create("probe", machine_id="m2")
        d1 = runtime.fire("m1", "start").deadline_us
        runtime.fire("m2", "watch")
        assert d1 is not None
        clock.set(d1 - 1)
        # m2's beat (2 s) is due, m1's timeout (10 s) is not: wait for the beat to land
        wait_until(lambda: runtime.get("m2").version >= 3, "m2's beat timer")
        assert runtime.get("m1").state == "working"
        runtime.fire("m2", "stop")
        clock.set(d1)
        wait_until(lambda: runtime.get("m1").state == "lost", "m1's timeout")
        last = list(log.read(machine_id="m1"))[-1]
        assert (last.trigger, last.ts_us, last.data) == ("timeout", d1, {"deadline_us": d1})


def _start_three(path: str, clock: ManualClock) -> dict[str, int]:
    deadlines: dict[str, int] = {}
    with open_recorder(path) as log, Runtime(log, registry(), clock=clock, run_timers=False) as runtime:
        for name, wait_s in (("soon", 5), ("later", 50)):
            runtime.create("probe", machine_id=name)
            runtime.fire(name, "start")
            state = runtime.fire(name, "pause", {"wait_s": wait_s})
            assert state.deadline_us is not None
            deadlines[name] = state.deadline_us
        runtime.create("probe", machine_id="idle")
    return deadlines


def test_recover_rearms_timers_from_the_projection(tmp_path: Path, clock: ManualClock) -> None:
    path = str(tmp_path / "timers.db")
    deadlines = _start_three(path, clock)
    clock.set(deadlines["soon"] + 1)  # the process was down past one deadline
    with open_recorder(path) as log, Runtime(log, registry(), clock=clock, run_timers=False) as runtime:
        report = runtime.recover()
        assert (report.timers_armed, report.overdue_timers) == (2, 1)
        assert runtime.next_deadline() == deadlines["soon"]
        assert runtime.run_due_timers() == 1  # the overdue one, at once
        assert runtime.get("soon").state == "lost"
        assert runtime.get("later").state == "waiting"
        expired = list(log.read(machine_id="soon"))[-1]
        assert expired.data == {"deadline_us": deadlines["soon"]}
        assert expired.ts_us == deadlines["soon"] + 1
        clock.set(deadlines["later"])
        assert runtime.run_due_timers() == 1
        assert runtime.get("later").state == "lost"


def test_recover_with_the_timer_thread_fires_overdue_timers_at_once(tmp_path: Path, clock: ManualClock) -> None:
    path = str(tmp_path / "timers.db")
    deadlines = _start_three(path, clock)
    clock.set(deadlines["soon"] + 1)
    with open_recorder(path) as log, Runtime(log, registry(), clock=clock, run_timers=True) as runtime:
        runtime.recover()
        # the clock does not move: only the re-armed, overdue timer can do this
        wait_until(lambda: runtime.get("soon").state == "lost", "the overdue timer after recover()")
        assert runtime.get("later").state == "waiting"


def test_recover_on_postgres_rearms_timers(pg_url: str, clock: ManualClock) -> None:
    deadlines = _start_three(pg_url, clock)
    clock.set(deadlines["later"])
    with open_recorder(pg_url) as log, Runtime(log, registry(), clock=clock, run_timers=False) as runtime:
        report = runtime.recover()
        assert (report.timers_armed, report.overdue_timers) == (2, 2)
        assert runtime.run_due_timers() == 2
        assert [s.state for s in map(runtime.get, ("soon", "later", "idle"))] == ["lost", "lost", "idle"]


def test_guarded_resume_cancels_the_waiting_timer(rt: Runtime, clock: ManualClock) -> None:
    rt.create("probe", machine_id="m1")
    rt.fire("m1", "start")
    waiting: MachineState = rt.fire("m1", "pause", {"wait_s": 3})
    assert waiting.deadline_us is not None
    rt.fire("m1", "resume", {"ok": True})
    clock.set(waiting.deadline_us)
    assert rt.run_due_timers() == 0
    assert rt.get("m1").state == "working"


class _Interleaving(Runtime):
    """Lets a test act between the timer's look at a machine and what it does next.

    Stands for another thread firing the machine at that instant: the first ``get``
    of ``machine_id`` made while ``in_timer`` is set runs ``meanwhile`` after reading.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.in_timer = False
        self.meanwhile: Callable[[], None] | None = None

    def get(self, machine_id: str) -> MachineState:
        state = super().get(machine_id)
        if self.in_timer and self.meanwhile is not None:
            act, self.meanwhile = self.meanwhile, None
            act()
        return state

    def run_due_timers(self, now_us: int | None = None) -> int:
        self.in_timer = True
        try:
            return super().run_due_timers(now_us)
        finally:
            self.in_timer = False


def test_timer_racing_a_transition_never_fires_early(log: EventRecorder, clock: ManualClock) -> None:
    with _Interleaving(log, registry(), clock=clock, run_timers=False) as runtime:
        runtime.create("probe", machine_id="m1")
        first = runtime.fire("m1", "start").deadline_us
        assert first is not None
        clock.set(first)

        def restart_work() -> None:
            # between the timer's check and its fire, the machine leaves working and
            # comes back with a fresh deadline: the old timer must not time it out
            runtime.fire("m1", "finish")
            runtime.fire("m1", "start")

        runtime.meanwhile = restart_work
        assert runtime.run_due_timers() == 0
        state = runtime.get("m1")
        assert (state.state, state.deadline_us) == ("working", first + 10 * US)
        assert [e.trigger for e in log.read(machine_id="m1")] == ["create", "start", "finish", "start"]
