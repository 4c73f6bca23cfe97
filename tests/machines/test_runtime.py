"""The machine runtime: fire -> guard -> append -> apply -> effects, on every backend."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.clock import ManualClock
from engine.errors import (
    ChartError,
    ConcurrencyConflict,
    EngineError,
    GuardRejected,
    TransitionRejected,
    UnknownMachine,
)
from engine.log.recorder import EventRecorder, StoredEvent
from engine.log.sql import open_recorder
from engine.machines.runtime import Runtime
from engine.machines.state import CREATE_TRIGGER, MachineState
from tests.machines.support import GUARDS, fold, registry, snapshot


@pytest.fixture
def log(backend_url: str) -> Iterator[EventRecorder]:
    """A fresh event log on each backend (memory, SQLite, PostgreSQL)."""
    recorder = open_recorder(backend_url)
    yield recorder
    recorder.close()


@pytest.fixture
def rt(log: EventRecorder, clock: ManualClock) -> Iterator[Runtime]:
    """A runtime over ``log`` with the test guards; timers run only when asked."""
    runtime = Runtime(log, registry(), clock=clock, writer="test", guards=GUARDS, run_timers=False)
    yield runtime
    runtime.close()


def test_create_and_fire_append_then_apply(rt: Runtime, log: EventRecorder, clock: ManualClock) -> None:
    created = rt.create("probe", machine_id="m1", data={"owner": "a"}, job_id="j1", site="s1")
    assert (created.state, created.version, created.terminal) == ("idle", 1, False)
    clock.advance(1.5)
    moved = rt.fire("m1", "start", {"n": 1})
    assert (moved.state, moved.version) == ("working", 2)
    assert rt.get("m1") == moved

    first, second = list(log.read(machine_id="m1"))
    assert (first.trigger, first.source, first.dest, first.version) == (CREATE_TRIGGER, None, "idle", 1)
    assert first.data == {"owner": "a"} and first.writer == "test"
    assert (first.job_id, first.site) == ("j1", "s1")
    assert (second.trigger, second.source, second.dest, second.version) == ("start", "idle", "working", 2)
    assert second.ts_us == first.ts_us + 1_500_000
    assert second.data == {"n": 1}
    row = log.get_machine("m1")
    assert row is not None
    assert (row.state, row.version, row.job_id, row.site) == ("working", 2, "j1", "s1")


def test_illegal_trigger_is_rejected_with_what_is_legal_and_writes_nothing(rt: Runtime, log: EventRecorder) -> None:
    rt.create("probe", machine_id="m1")
    rt.fire("m1", "start")
    before = snapshot(log)
    with pytest.raises(TransitionRejected) as info:
        rt.fire("m1", "retire", {"remaining": 0})
    err = info.value
    assert type(err) is TransitionRejected
    assert (err.machine_id, err.kind, err.state, err.trigger) == ("m1", "probe", "working", "retire")
    assert err.legal == ["finish", "kill", "pause", "progress", "timeout"]
    for word in ("'m1'", "'working'", "'retire'", "finish, kill, pause, progress, timeout"):
        assert word in str(err)
    assert snapshot(log) == before
    assert rt.get("m1").version == 2
    # the machine is still usable afterwards
    assert rt.fire("m1", "finish").state == "idle"


def test_trigger_unknown_to_the_chart_and_terminal_states_are_rejected(rt: Runtime, log: EventRecorder) -> None:
    rt.create("probe", machine_id="m1")
    with pytest.raises(TransitionRejected, match="'no_such_trigger'"):
        rt.fire("m1", "no_such_trigger")
    rt.fire("m1", "kill")
    before = snapshot(log)
    with pytest.raises(TransitionRejected) as info:
        rt.fire("m1", "start")
    assert info.value.legal == []
    assert "none (terminal state)" in str(info.value)
    assert snapshot(log) == before


def test_guard_that_says_no_writes_nothing(rt: Runtime, log: EventRecorder) -> None:
    rt.create("probe", machine_id="m1")
    before = snapshot(log)
    with pytest.raises(GuardRejected) as info:
        rt.fire("m1", "retire", {"remaining": 3})
    assert info.value.guard == "all_done"
    assert (info.value.state, info.value.trigger) == ("idle", "retire")
    assert "guard 'all_done'" in str(info.value)
    assert snapshot(log) == before
    assert rt.fire("m1", "retire", {"remaining": 0}).state == "done"


def test_unregistered_guard_is_a_clear_error(log: EventRecorder, clock: ManualClock) -> None:
    with Runtime(log, registry(), clock=clock, run_timers=False) as bare:
        bare.create("probe", machine_id="m1")
        before = snapshot(log)
        with pytest.raises(GuardRejected, match=r"all_done \(not registered\)") as info:
            bare.fire("m1", "retire", {"remaining": 0})
        assert "not registered" in info.value.guard
        assert snapshot(log) == before
        bare.add_guard("all_done", lambda _s, data: data.get("remaining") == 0)
        assert bare.fire("m1", "retire", {"remaining": 0}).state == "done"


def test_unknown_machine_and_unknown_kind(rt: Runtime, log: EventRecorder) -> None:
    with pytest.raises(UnknownMachine) as info:
        rt.fire("ghost", "start")
    assert info.value.machine_id == "ghost"
    with pytest.raises(UnknownMachine):
        rt.get("ghost")
    with pytest.raises(ChartError, match="no statechart for nope"):
        rt.create("nope")
    with pytest.raises(EngineError, match="has no state 'nowhere'"):
        rt.on_enter("probe", "nowhere", lambda *_: None)
    assert log.last_seq() == 0


def test_creating_an_existing_machine_is_a_conflict(rt: Runtime, log: EventRecorder) -> None:
    rt.create("probe", machine_id="m1")
    rt.fire("m1", "start")
    before = snapshot(log)
    with pytest.raises(ConcurrencyConflict) as info:
        rt.create("probe", machine_id="m1")
    assert (info.value.machine_id, info.value.expected, info.value.actual) == ("m1", 0, 2)
    assert snapshot(log) == before


def test_second_runtime_moving_a_machine_is_a_conflict_not_an_overwrite(
    log: EventRecorder, clock: ManualClock
) -> None:
    charts = registry()
    with Runtime(log, charts, clock=clock, run_timers=False) as a, \
            Runtime(log, charts, clock=clock, run_timers=False) as b:
        a.create("probe", machine_id="m1")
        assert a.get("m1").state == "idle"  # a caches the machine at version 1
        b.fire("m1", "start")
        before = snapshot(log)
        with pytest.raises(ConcurrencyConflict) as info:
            a.fire("m1", "watch")
        assert (info.value.machine_id, info.value.expected, info.value.actual) == ("m1", 1, 2)
        assert snapshot(log) == before
        # a reloads from the log: it now sees working, where watch is illegal
        assert a.get("m1").state == "working"
        with pytest.raises(TransitionRejected):
            a.fire("m1", "watch")
        assert a.fire("m1", "finish").version == 3


def test_effects_run_after_the_event_is_durable(rt: Runtime, log: EventRecorder) -> None:
    seen: list[tuple[int, str, bool, bool]] = []

    def effect(runtime: Runtime, event: StoredEvent, state: MachineState, redriven: bool) -> None:
        # the event is already in the log (and the projection) when the effect runs
        in_log = any(e.seq == event.seq for e in runtime.recorder.read(machine_id=event.machine_id))
        row = runtime.recorder.get_machine(event.machine_id)
        assert row is not None
        seen.append((event.seq, state.state, in_log and row.version == event.version, redriven))

    rt.on_enter("probe", "working", effect)
    rt.create("probe", machine_id="m1")
    assert seen == []
    rt.fire("m1", "start")
    rt.fire("m1", "progress")  # a self-transition enters working again
    with pytest.raises(TransitionRejected):
        rt.fire("m1", "resume", {"ok": True})  # rejected: no effect
    assert [(state, durable, redriven) for _, state, durable, redriven in seen] == [
        ("working", True, False), ("working", True, False)]
    assert [seq for seq, *_ in seen] == [e.seq for e in log.read(machine_id="m1")][1:]


def test_a_failing_effect_does_not_undo_the_transition(
    rt: Runtime, log: EventRecorder, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*_: object) -> None:
        raise RuntimeError("receiver down")

    rt.on_enter("probe", "working", broken)
    rt.create("probe", machine_id="m1")
    assert rt.fire("m1", "start").state == "working"
    assert log.get_machine("m1").state == "working"  # type: ignore[union-attr]
    assert "receiver down" in caplog.text


def test_recover_redrives_effects_of_live_machines(tmp_path: Path, clock: ManualClock) -> None:
    path = str(tmp_path / "effects.db")
    charts = registry()
    with open_recorder(path) as log, Runtime(log, charts, clock=clock, run_timers=False) as first:
        for name in ("a", "b", "c"):
            first.create("probe", machine_id=name)
        first.fire("a", "start")
        first.fire("b", "start")
        first.fire("b", "kill")  # terminal: nothing to re-drive
        first.fire("c", "watch")
        last_of_a = list(log.read(machine_id="a"))[-1]

    calls: list[tuple[str, int, bool]] = []
    with open_recorder(path) as log, Runtime(log, charts, clock=clock, run_timers=False) as second:
        second.on_enter("probe", "working", lambda _rt, ev, st, redriven: calls.append((st.machine_id, ev.seq, redriven)))
        report = second.recover()
        assert calls == [("a", last_of_a.seq, True)]
        assert report.effects_redriven == 1
        assert report.last_seq == log.last_seq()
        second.fire("a", "progress")
        assert calls[-1][0] == "a" and calls[-1][2] is False


def test_fire_async_from_many_tasks(rt: Runtime, log: EventRecorder) -> None:
    async def main() -> list[MachineState]:
        await asyncio.gather(*(rt.create_async("probe", machine_id=f"m{i}") for i in range(20)))
        started = await asyncio.gather(*(rt.fire_async(f"m{i}", "start") for i in range(20)))
        # two tasks on one machine are serialized: both apply, in some order
        await asyncio.gather(rt.fire_async("m0", "progress"), rt.fire_async("m0", "progress"))
        with pytest.raises(TransitionRejected):
            await rt.fire_async("m1", "stop")
        return list(started)

    started = asyncio.run(main())
    assert {s.state for s in started} == {"working"}
    assert rt.get("m0").version == 4
    assert log.last_seq() == 20 + 20 + 2
    assert {m: s.version for m, s in fold(log, rt.charts).items()} == {
        f"m{i}": (4 if i == 0 else 2) for i in range(20)}


def test_group_commit_batches_async_callers(log: EventRecorder, clock: ManualClock) -> None:
    with Runtime(log, registry(), clock=clock, run_timers=False) as runtime:
        async def main() -> None:
            await asyncio.gather(*(runtime.create_async("probe", machine_id=f"m{i}") for i in range(64)))

        asyncio.run(main())
        batches, events = runtime.commit_stats
        assert events == 64
        assert batches < events


def test_group_commit_batches_concurrent_threads(tmp_path: Path, clock: ManualClock) -> None:
    threads_n, per_thread = 16, 25
    with open_recorder(str(tmp_path / "gc.db")) as log, \
            Runtime(log, registry(), clock=clock, run_timers=False) as runtime:
        for t in range(threads_n):
            runtime.create("probe", machine_id=f"m{t}")
        created_batches, _ = runtime.commit_stats
        barrier = threading.Barrier(threads_n)
        errors: list[BaseException] = []

        def work(t: int) -> None:
            try:
                barrier.wait()
                runtime.fire(f"m{t}", "start")
                for _ in range(per_thread - 2):
                    runtime.fire(f"m{t}", "progress")
                runtime.fire(f"m{t}", "finish")
            except BaseException as exc:  # reported below
                errors.append(exc)

        workers = [threading.Thread(target=work, args=(t,)) for t in range(threads_n)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        assert errors == []
        batches, events = runtime.commit_stats
        assert events == threads_n * (per_thread + 1)
        assert batches - created_batches < threads_n * per_thread
        states = fold(log, runtime.charts)
        assert all(s.state == "idle" and s.version == per_thread + 1 for s in states.values())


def test_a_machine_moved_on_before_its_creator_resumed_keeps_its_newest_state(rt: Runtime,
                                                                            log: EventRecorder) -> None:
    """An asyncio caller that sees a new machine in the log (committed, its creator not yet
    resumed) and fires on it must not have its state replaced by the creation's."""
    import time as _time

    async def main() -> MachineState:
        creating = asyncio.ensure_future(rt.create_async("probe", machine_id="j-race"))
        for _ in range(3):  # let the creation queue its event and wake the writer
            await asyncio.sleep(0)
        deadline = _time.monotonic() + 10
        while log.get_machine("j-race") is None:  # committed by the writer thread; the creator has not resumed
            assert _time.monotonic() < deadline
            _time.sleep(0.001)
        moved = asyncio.ensure_future(rt.fire_async("j-race", "start"))
        await creating
        await moved
        return rt.get("j-race")

    state = asyncio.run(main())
    assert (state.state, state.version) == ("working", 2)
    assert rt.fire("j-race", "progress").version == 3  # no conflict with a stale cached version
