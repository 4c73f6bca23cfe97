"""The event-sourced machine runtime: fire -> guard -> append -> apply -> effects.

``Runtime.fire`` checks the trigger against the machine's chart and guard, appends
the event through the group committer with the expected version, and only once it
is durable updates the in-memory state and runs the side effects registered for
the state entered. Nothing is written for an illegal trigger.

Timers are deadlines stored in the events: whenever a machine enters a state with a
timeout its absolute deadline goes into the event and the projection; a scheduler
fires the state's timeout trigger when it passes. ``recover`` re-arms timers from
the projection (overdue ones fire at once) and re-drives the entry effects of every
live machine; receivers of effects are idempotent by event id.

Only live machines are cached; terminal ones are dropped from memory once reached.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from engine.charts.model import Chart
from engine.charts.registry import ChartRegistry
from engine.clock import Clock
from engine.errors import ConcurrencyConflict, EngineError, UnknownMachine
from engine.log.recorder import AppendResult, EventRecorder, NewEvent, StoredEvent, stored_from_new
from engine.machines.committer import GroupCommitter
from engine.machines.state import Guard, MachineState, plan, plan_create, step
from engine.machines.timers import TimerQueue

__all__ = ["Effect", "RecoveryReport", "Runtime"]

logger = logging.getLogger(__name__)

#: a side effect: called after the event is durable; ``redriven`` is True after a restart
Effect = Callable[["Runtime", StoredEvent, MachineState, bool], None]


@dataclass
class _Entry:
    state: MachineState
    lock: threading.Lock = field(default_factory=threading.Lock)
    alock: asyncio.Lock | None = None


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    """What ``recover`` found and did."""

    live_machines: int
    timers_armed: int
    overdue_timers: int
    effects_redriven: int
    last_seq: int


class Runtime:
    """Drives machines of every kind in ``charts`` against one event log.

    Args:
        recorder: the event log (its writer lease is the caller's business).
        charts: the statecharts; the newest version of each kind drives new events.
        clock: the only source of time and ids.
        writer: recorded in every event (who wrote it).
        guards: named predicates referenced by chart transitions.
        run_timers: start a thread that fires timeouts as their deadlines pass; a
            deterministic driver turns it off and calls ``run_due_timers`` itself.
    """

    def __init__(
        self,
        recorder: EventRecorder,
        charts: ChartRegistry,
        *,
        clock: Clock,
        writer: str = "fedlog",
        guards: Mapping[str, Guard] | None = None,
        run_timers: bool = True,
        max_batch: int = 4096,
    ) -> None:
        self.recorder = recorder
        self.charts = charts
        self.clock = clock
        self.writer = writer
        self.guards: dict[str, Guard] = dict(guards or {})
        self._committer = GroupCommitter(recorder, max_batch=max_batch)
        self._entries: dict[str, _Entry] = {}
        self._entries_lock = threading.Lock()
        self._effects: dict[tuple[str, str], list[Effect]] = {}
        self._newest: dict[str, Chart] = {}  # kind -> chart driving new events (hot-path cache)
        self._timers = TimerQueue()
        self._timer_cond = self._timers.cond
        self._closing = False
        self._timer_thread: threading.Thread | None = None
        if run_timers:
            clock.subscribe(self._wake_timers)
            self._timer_thread = threading.Thread(target=self._timer_loop, name="fedlog-timers", daemon=True)
            self._timer_thread.start()

    # -- registration -------------------------------------------------------------

    def on_enter(self, kind: str, state: str, effect: Effect) -> None:
        """Run ``effect`` after any event that enters ``state`` of ``kind`` is durable."""
        chart = self.charts.get(kind)
        if state not in chart.states:
            raise EngineError(f"{kind} has no state {state!r}; states: {', '.join(chart.states)}")
        self._effects.setdefault((kind, state), []).append(effect)

    def add_guard(self, name: str, guard: Guard) -> None:
        """Register a named guard used by chart transitions."""
        self.guards[name] = guard

    # -- machine access -----------------------------------------------------------

    def _entry(self, machine_id: str) -> _Entry:
        entry = self._entries.get(machine_id)
        if entry is not None:
            return entry
        row = self.recorder.get_machine(machine_id)
        if row is None:
            raise UnknownMachine(machine_id)
        with self._entries_lock:
            entry = self._entries.get(machine_id)
            if entry is None:
                entry = _Entry(MachineState.from_row(row))
                self._entries[machine_id] = entry
        return entry

    def get(self, machine_id: str) -> MachineState:
        """The machine's current state (from memory, else from the projection)."""
        entry = self._entries.get(machine_id)
        if entry is not None:
            return entry.state
        row = self.recorder.get_machine(machine_id)
        if row is None:
            raise UnknownMachine(machine_id)
        return MachineState.from_row(row)

    # -- creating and firing --------------------------------------------------------

    def _new_event(
        self, kind: str, machine_id: str | None, data: Mapping[str, Any] | None,
        job_id: str | None, round: int | None, site: str | None, deadline_us: int | None,
    ) -> NewEvent:
        chart = self.charts.get(kind)
        return plan_create(
            chart, machine_id or self.clock.new_id(), data=data, now_us=self.clock.now_us(),
            writer=self.writer, job_id=job_id, round=round, site=site, deadline_us=deadline_us,
        )

    def create(
        self, kind: str, *, machine_id: str | None = None, data: Mapping[str, Any] | None = None,
        job_id: str | None = None, round: int | None = None, site: str | None = None,
        deadline_us: int | None = None,
    ) -> MachineState:
        """Create a machine of ``kind`` in its initial state; return it once durable."""
        event = self._new_event(kind, machine_id, data, job_id, round, site, deadline_us)
        result = self._committer.append(event)
        return self._created(event, result)

    async def create_async(
        self, kind: str, *, machine_id: str | None = None, data: Mapping[str, Any] | None = None,
        job_id: str | None = None, round: int | None = None, site: str | None = None,
        deadline_us: int | None = None,
    ) -> MachineState:
        """``create`` for asyncio callers."""
        event = self._new_event(kind, machine_id, data, job_id, round, site, deadline_us)
        result = await self._committer.append_async(event)
        return self._created(event, result)

    def _created(self, event: NewEvent, result: AppendResult) -> MachineState:
        if result.error is not None:
            raise result.error
        assert result.seq is not None
        state = step(None, event, event.terminal)
        if not state.terminal:
            with self._entries_lock:
                # another caller may have loaded the machine from the log (and moved it on)
                # between the commit and this line; its entry is newer than the creation
                self._entries.setdefault(state.machine_id, _Entry(state))
        self._after_commit(event, result.seq, state, None)
        return state

    def fire(
        self, machine_id: str, trigger: str, data: Mapping[str, Any] | None = None, *,
        deadline_us: int | None = None, round: int | None = None,
    ) -> MachineState:
        """Fire ``trigger`` on a machine; return its new state once the event is durable.

        Raises ``TransitionRejected`` (or ``GuardRejected``) without writing anything
        when the trigger is not legal in the current state, ``UnknownMachine`` for an
        id the log does not have, ``ConcurrencyConflict`` if another writer moved it.
        """
        entry = self._entry(machine_id)
        with entry.lock:
            previous = entry.state.deadline_us
            event = self._plan(entry.state, trigger, data, deadline_us, round)
            result = self._committer.append(event)
            state = self._applied(entry, event, result)
        self._after_commit(event, result.seq or 0, state, previous)
        return state

    async def fire_async(
        self, machine_id: str, trigger: str, data: Mapping[str, Any] | None = None, *,
        deadline_us: int | None = None, round: int | None = None,
    ) -> MachineState:
        """``fire`` for asyncio callers: awaits durability without blocking the loop."""
        entry = self._entry(machine_id)
        if entry.alock is None:
            entry.alock = asyncio.Lock()
        async with entry.alock:
            previous = entry.state.deadline_us
            event = self._plan(entry.state, trigger, data, deadline_us, round)
            result = await self._committer.append_async(event)
            state = self._applied(entry, event, result)
        self._after_commit(event, result.seq or 0, state, previous)
        return state

    def _plan(
        self, current: MachineState, trigger: str, data: Mapping[str, Any] | None,
        deadline_us: int | None, round: int | None,
    ) -> NewEvent:
        chart = self._newest.get(current.kind)
        if chart is None:
            chart = self._newest[current.kind] = self.charts.get(current.kind)
        return plan(chart, current, trigger, data=data, now_us=self.clock.now_us(), writer=self.writer,
                    guards=self.guards, deadline_us=deadline_us, round=round)

    def _applied(self, entry: _Entry, event: NewEvent, result: AppendResult) -> MachineState:
        if result.error is not None:
            self._forget(event.machine_id)  # reload from the log next time
            raise result.error
        state = step(entry.state, event, event.terminal)
        entry.state = state
        if state.terminal:
            self._forget(state.machine_id)
        return state

    def _forget(self, machine_id: str) -> None:
        with self._entries_lock:
            self._entries.pop(machine_id, None)

    def _after_commit(self, event: NewEvent, seq: int, state: MachineState, previous_deadline: int | None) -> None:
        if state.deadline_us is not None and not state.terminal:
            if state.deadline_us != previous_deadline:
                self._timers.arm(state.deadline_us, state.machine_id)
        elif previous_deadline is not None:
            self._timers.disarm(state.machine_id)
        if (state.kind, state.state) in self._effects:
            self._run_effects(stored_from_new(event, seq), state, redriven=False)

    def _run_effects(self, event: StoredEvent, state: MachineState, *, redriven: bool) -> int:
        effects = self._effects.get((state.kind, state.state))
        if not effects:
            return 0
        for effect in effects:
            try:
                effect(self, event, state, redriven)
            except Exception:
                logger.exception("effect %s for %s %s (event %s) failed",
                                 getattr(effect, "__name__", effect), state.kind, state.machine_id, event.seq)
        return len(effects)

    # -- timers ---------------------------------------------------------------------

    def _wake_timers(self) -> None:
        with self._timer_cond:
            self._timer_cond.notify()

    def next_deadline(self) -> int | None:
        """The earliest armed deadline (µs), or None when no timer is armed."""
        return self._timers.next_deadline()

    def run_due_timers(self, now_us: int | None = None) -> int:
        """Fire every timer due at ``now_us`` (default: the clock's now), in deadline order.

        A timer whose machine has moved on (another version) is stale and dropped.
        Returns the number of timeouts fired.
        """
        now = self.clock.now_us() if now_us is None else now_us
        fired = 0
        while True:
            due = self._timers.pop_due(now)
            if due is None:
                return fired
            deadline, machine_id = due
            if self._fire_timer(deadline, machine_id):
                fired += 1

    def _fire_timer(self, deadline: int, machine_id: str) -> bool:
        # A timer is still armed only while the machine holds exactly this deadline;
        # any other (moved on, re-armed, terminal) makes the heap entry stale.
        try:
            current = self.get(machine_id)
        except UnknownMachine:
            return False
        if current.terminal or current.deadline_us != deadline:
            return False
        # Check again under the machine's lock and plan from exactly the state checked:
        # another thread may have moved the machine since the look above (and even
        # brought it back to a state with the same timeout trigger but a later deadline).
        entry = self._entry(machine_id)
        try:
            with entry.lock:
                current = entry.state
                if current.terminal or current.deadline_us != deadline:
                    return False
                spec = self.charts.get(current.kind).states[current.state].timeout
                if spec is None:
                    return False
                event = self._plan(current, spec.trigger, {"deadline_us": deadline}, None, None)
                result = self._committer.append(event)
                state = self._applied(entry, event, result)
        except ConcurrencyConflict:
            return False  # someone moved it first: the timer is stale
        except EngineError:
            logger.exception("timeout of %s %s could not fire", current.kind, machine_id)
            return False
        self._after_commit(event, result.seq or 0, state, deadline)
        return True

    def _timer_loop(self) -> None:
        while True:
            with self._timer_cond:
                if self._closing:
                    return
                nxt = self._timers.next_deadline()
                if nxt is None or nxt > self.clock.now_us():
                    self.clock.wait(self._timer_cond, nxt)
                if self._closing:
                    return
            self.run_due_timers()

    # -- recovery -------------------------------------------------------------------

    def recover(self) -> RecoveryReport:
        """Rebuild live work from the log after a (re)start.

        Reads the projection (not the whole log): re-arms every stored deadline, then
        re-drives the entry effects of live machines whose state has any. Overdue
        timers fire at once (by the timer thread, or by ``run_due_timers``).
        """
        timers = self.recorder.timers()
        now = self.clock.now_us()
        for deadline, machine_id, _version in timers:
            self._timers.arm(deadline, machine_id)
        with self._timer_cond:
            self._timer_cond.notify()
        redriven = 0
        live = 0
        if self._effects:
            kinds = {kind for kind, _ in self._effects}
            for kind in sorted(kinds):
                for row in self.recorder.machines(kind=kind, live_only=True):
                    live += 1
                    state = MachineState.from_row(row)
                    if (state.kind, state.state) not in self._effects:
                        continue
                    tail = deque(self.recorder.read(machine_id=state.machine_id), maxlen=1)
                    if tail:
                        last = tail[0]
                        redriven += self._run_effects(last, state, redriven=True)
        return RecoveryReport(
            live_machines=live, timers_armed=len(timers),
            overdue_timers=sum(1 for d, _, _ in timers if d <= now),
            effects_redriven=redriven, last_seq=self.recorder.last_seq(),
        )

    # -- shutdown -------------------------------------------------------------------

    def close(self) -> None:
        """Stop timers, flush queued appends. The recorder stays open (the caller owns it)."""
        with self._timer_cond:
            self._closing = True
            self._timer_cond.notify_all()
        if self._timer_thread is not None:
            self.clock.unsubscribe(self._wake_timers)
            self._timer_thread.join()
        self._committer.close()

    @property
    def commit_stats(self) -> tuple[int, int]:
        """(batches committed, events committed) since start: the group-commit ratio."""
        return self._committer.batches, self._committer.events

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
