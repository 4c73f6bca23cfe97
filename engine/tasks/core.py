"""The task manager's machinery: the cache of tasks, the rules performed, the effects handled.

``TaskCore`` holds the in-memory indexes (every cached task and its shares, the
standing tasks in schedule order) and the steps that keep them and the log in
step: hand a share out, take a result, perform what the completion rules
(``engine.tasks.rules``) decide, close a finished task's shares, run its
``task_done_cb``. ``TaskManager`` (``engine.tasks.manager``) is the public API on
top. All of it runs on one asyncio loop; the runtime's timer thread and its entry
effects only post work to that loop through the ``LoopBridge``.

Concurrency on the loop: each task has a re-entrant lock held while its shape
changes (completion, a relay or SEQUENTIAL send moving on, a send binding to a
site); a broadcast's sends and results touch only their own share machines, whose
appends the runtime serialises, so they batch into group commits. Any fire that
loses a race with the timer thread is re-read from the runtime, never retried blind.
"""

from __future__ import annotations

import asyncio
import bisect
import inspect
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine.clock import Clock
from engine.errors import (
    ConcurrencyConflict,
    EngineError,
    TransitionRejected,
    UnknownMachine,
)
from engine.log.recorder import StoredEvent
from engine.machines.runtime import Runtime
from engine.machines.state import MachineState
from engine.tasks.bridge import Item, LoopBridge
from engine.tasks.records import (
    SAME,
    ClientTaskRecord,
    TaskRecord,
    Unscheduled,
    client_task_id,
    load_share,
    load_task,
    task_id_of,
)
from engine.tasks.rules import Advance, Create, End, Expire, Idle, ReachMin, Step, decide
from engine.tasks.sites import SiteTracker
from engine.tasks.spec import (
    RELAY,
    SEND,
    ClientTaskView,
    SubmissionOutcome,
    Task,
    TaskAssignment,
    TaskCompletionStatus,
    TaskError,
    TaskOutcome,
    TaskResult,
    as_json,
    check_seconds,
    status_of_state,
)

__all__ = ["REJECTED", "LiveTask", "TaskCore"]

logger = logging.getLogger(__name__)

US = 1_000_000
_TERMINAL_TASK_STATES = ("completed", "timed_out", "errored", "cancelled", "aborted", "client_dead")
#: what a fire that lost a race raises (nothing was written)
REJECTED = (TransitionRejected, ConcurrencyConflict)


class _ReLock:
    """An asyncio lock its holder may take again (a callback run under it may cancel its task)."""

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._owner: asyncio.Task[Any] | None = None
        self._depth = 0

    async def __aenter__(self) -> None:
        me = asyncio.current_task()
        if self._owner is me and me is not None:
            self._depth += 1
            return
        await self._lock.acquire()
        self._owner, self._depth = me, 1

    async def __aexit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._owner = None
            self._lock.release()


@dataclass(eq=False)
class LiveTask:
    """A cached task: its record, its Task object (callbacks) and its place in the lifecycle."""

    rec: TaskRecord
    task: Task | None = None
    lock: _ReLock = field(default_factory=_ReLock)
    ending: bool = False
    finished: bool = False
    delivered: bool = False
    outcome: TaskOutcome | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)


async def _call(cb: Callable[..., Any], *args: Any) -> None:
    result = cb(*args)
    if inspect.isawaitable(result):
        await result


class TaskCore:
    """The state and machinery behind ``TaskManager`` (see the module docstring)."""

    def __init__(self, runtime: Runtime, *, clock: Clock, job_id: str | None = None,
                 client_dead_grace: float = 30.0, heartbeat_timeout: float = 60.0, dead_grace: float = 60.0,
                 heartbeat_record_interval: float = 1.0, keep_finished: int = 1000) -> None:
        self.runtime = runtime
        self.recorder = runtime.recorder
        self.clock = clock
        self.job_id = job_id
        self.client_dead_grace = check_seconds(client_dead_grace, "client_dead_grace")
        self.sites = SiteTracker(runtime, heartbeat_timeout=heartbeat_timeout, dead_grace=dead_grace,
                                 record_interval=heartbeat_record_interval, on_change=self._site_changed)
        self._bridge = LoopBridge(clock, self._handle, self._alarm)
        self._tasks: dict[str, LiveTask] = {}
        self._standing: list[LiveTask] = []
        self._unscheduled: dict[str, Unscheduled] = {}
        self._finished: deque[str] = deque()
        self._keep_finished = keep_finished
        self._counters: dict[str | None, int] = {}
        self._site_listeners: list[Callable[[str, str], None]] = []
        self._work = asyncio.Event()
        #: where payloads referenced by task data and results live (set by the server)
        self.chunk_store: Any = None
        for state in _TERMINAL_TASK_STATES:
            runtime.on_enter("task", state, self._task_effect)
        runtime.on_enter("client_task", "timed_out", self._share_effect)
        for state in ("missing", "dead"):  # the timer's moves; every other site move is ours
            runtime.on_enter("site", state, self._site_effect)

    # -- waking polling sites -----------------------------------------------------------

    def work_signal(self) -> asyncio.Event:
        """An event set at the next change that may give some site work (a schedule, a hop, a slot).

        A long poll takes the signal *before* asking for work and waits on it when it got
        none, so a change between the two is never missed.
        """
        return self._work

    def _work_changed(self) -> None:
        signal, self._work = self._work, asyncio.Event()
        signal.set()

    # -- dispatch -----------------------------------------------------------------------

    async def _offer_locked(self, live: LiveTask, site: str) -> TaskAssignment | None:
        if await self._evaluate_locked(live):
            return None
        rec = live.rec
        if rec.method == SEND:
            bound = rec.bound()
            if bound is not None:
                return await self._hand_out(live, bound) if bound.site == site and bound.live else None
            share = rec.hop_ct(rec.hop) if rec.sequential_send else rec.ct_of(site)
            if share is None or share.site != site or share.state != "assigned":
                return None
            assignment = await self._hand_out(live, share)
            if assignment is not None and not rec.sequential_send:
                # a send goes to one site: the other candidates' shares end now
                await asyncio.gather(*(self._fire_share(rec, other, "cancel", {"reason": "sent_to_other_site"})
                                       for other in list(rec.cts.values()) if other is not share and other.live))
            return assignment
        if rec.method == RELAY:
            if site not in rec.targets:  # dynamic_targets: a site that asks joins at the end
                await self._fire_task(live, "add_target", {"site": site})
            share = rec.hop_ct(rec.hop)
            if share is None or share.site != site or not share.live:
                return None
            return await self._hand_out(live, share)
        share = rec.ct_of(site)  # broadcast_forever: a site that answered gets the next round
        if share is not None and share.state == "result_received":
            k = (share.hop or 0) + 1
            await self._create_shares(live, ((client_task_id(rec.task_id, site, k), site, k, None),))
            share = rec.ct_of(site)
        if share is None or not share.live:
            return None
        return await self._hand_out(live, share)

    async def _hand_out(self, live: LiveTask, share: ClientTaskRecord) -> TaskAssignment | None:
        rec, task = live.rec, live.task
        resend = share.state == "sent"
        base = rec.base_data(share)
        data = base
        if task is not None and task.before_task_sent_cb is not None:
            view = self._view(live, share, as_json(base, "task.data"))
            try:
                await _call(task.before_task_sent_cb, view)
                data = as_json(view.data, "data set by before_task_sent_cb")
            except Exception as exc:
                logger.exception("before_task_sent_cb of task %s failed", rec.task_id)
                await self._fail(live, f"before_task_sent_cb raised {exc!r}")
                return None
            if live.ending or not rec.standing:
                return None  # the callback ended the task
        payload: dict[str, Any] = {}
        if data is not base and data != base:
            payload["data"] = data
        if rec.method == RELAY and not resend and rec.task_result_timeout > 0:
            payload["task_result_timeout"] = rec.task_result_timeout
        state = await self._fire_share(rec, share, "resend" if resend else "send", payload or None)
        if state is None:
            return None
        return TaskAssignment(rec.task_id, share.ct_id, rec.name, share.site, data, dict(rec.props), resend,
                              share.send_count, share.hop, rec.job_id)

    def _view(self, live: LiveTask, share: ClientTaskRecord, data: Any, result: Any = None,
              next_data: Any = None) -> ClientTaskView:
        rec = live.rec
        return ClientTaskView(live.task, rec.task_id, share.ct_id, rec.name, share.site, share.hop, data,
                              dict(rec.props), share.send_count, result, next_data)

    # -- results ------------------------------------------------------------------------

    def _classify(self, live: LiveTask, share: ClientTaskRecord, site: str) -> SubmissionOutcome | None:
        if share.site != site:
            return SubmissionOutcome.WRONG_SITE
        if share.state == "result_received":
            return SubmissionOutcome.DUPLICATE
        if share.state == "assigned":
            return SubmissionOutcome.UNKNOWN_TASK  # never handed out: no site can hold it
        if share.state != "sent" or live.ending or not live.rec.standing:
            return SubmissionOutcome.LATE
        return None

    async def _accept(self, live: LiveTask, share: ClientTaskRecord, result: Any) -> SubmissionOutcome:
        rec, task = live.rec, live.task
        error = None
        final, next_data = result, SAME
        if task is not None and task.result_received_cb is not None:
            base = rec.base_data(share)
            relay_next = as_json(base, "task.data") if rec.method == RELAY else None
            view = self._view(live, share, base, result, relay_next)
            try:
                await _call(task.result_received_cb, view)
                final = as_json(view.result, "result set by result_received_cb")
                if rec.method == RELAY and view.next_data != base:
                    next_data = as_json(view.next_data, "next_data set by result_received_cb")
            except Exception as exc:
                logger.exception("result_received_cb of task %s failed", rec.task_id)
                error, final = f"result_received_cb raised {exc!r}", result
        payload: dict[str, Any] = {"result": final}
        if next_data is not SAME:
            payload["next_data"] = next_data
        if await self._fire_share(rec, share, "result", payload) is None:
            return self._classify(live, share, share.site) or SubmissionOutcome.LATE
        if error is not None:
            await self._fail(live, error)
        else:
            await self._evaluate(live)
        return SubmissionOutcome.ACCEPTED

    async def _drop(self, live: LiveTask, site: str, share: ClientTaskRecord, outcome: SubmissionOutcome) -> None:
        if live.ending or not live.rec.standing:
            return  # the task is over: its terminal state answers for it, nothing is written
        data = {"site": site, "reason": outcome.value, "client_task_id": share.ct_id}
        if outcome is SubmissionOutcome.WRONG_SITE:
            data["owner"] = share.site
        try:
            await self.runtime.fire_async(live.rec.task_id, "drop_result", data)
        except REJECTED:
            logger.debug("task %s ended before the dropped result was recorded", live.rec.task_id)

    # -- the rules, performed ---------------------------------------------------------------

    async def _evaluate(self, live: LiveTask) -> None:
        async with live.lock:
            await self._evaluate_locked(live)
        await self._deliver(live)

    async def _evaluate_locked(self, live: LiveTask) -> bool:
        """Perform the rules' steps until they say Idle; True once the task is over."""
        rec = live.rec
        grace = round(self.client_dead_grace * US)
        for _ in range(4 * len(rec.targets) + 64):
            if live.finished:
                return True
            current = self.runtime.get(rec.task_id)
            if current.terminal:
                self._timer_ended(rec, current.state)
                await self._finish_locked(live)
                return True
            step = decide(rec, self.clock.now_us(), self.sites.is_dead, grace)
            if isinstance(step, Idle):
                if step.wake_at_us is not None:
                    self._bridge.add_alarm(step.wake_at_us, rec.task_id)
                return False
            await self._perform(live, step)
        raise EngineError(f"task {rec.task_id}: the completion rules did not settle; last state {rec.state}")

    async def _perform(self, live: LiveTask, step: Step) -> None:
        rec = live.rec
        if isinstance(step, End):
            await self._end_locked(live, step.trigger, {"reason": step.reason, **step.extra})
        elif isinstance(step, ReachMin):
            await self._fire_task(live, "min_reached", {"wait_time_after_min_received": step.wait,
                                                        "received": step.received})
        elif isinstance(step, Expire):
            await self._fire_share(rec, rec.cts[step.ct_id], "timeout",
                                   {"deadline_us": step.deadline_us, "reason": "expired"})
        elif isinstance(step, Advance):
            payload: dict[str, Any] = {"index": step.index, "reason": step.reason,
                                       "window_start_us": step.window_start_us}
            if step.data is not SAME:
                payload["data"] = step.data
            await self._fire_task(live, "advance", payload)
        elif isinstance(step, Create):
            await self._create_shares(live, step.shares)

    async def _fire_task(self, live: LiveTask, trigger: str, data: dict[str, Any]) -> None:
        rec = live.rec
        now = self.clock.now_us()
        try:
            state = await self.runtime.fire_async(rec.task_id, trigger, data)
        except REJECTED:
            if not self.runtime.get(rec.task_id).terminal:
                raise
            return  # a timer ended the task first; the caller's next look sees it
        rec.apply(trigger, data, now, state.state, state.deadline_us)
        self._work_changed()

    async def _fire_share(self, rec: TaskRecord, share: ClientTaskRecord, trigger: str,
                          data: dict[str, Any] | None) -> MachineState | None:
        now = self.clock.now_us()
        try:
            state = await self.runtime.fire_async(share.ct_id, trigger, data)
        except REJECTED:
            current = self.runtime.get(share.ct_id)
            if current.state != share.state:
                # only the timer changes a share behind our back, and only to timed_out
                share.apply("timeout" if current.state == "timed_out" else current.state, None, now,
                            current.state, current.deadline_us)
            return None
        share.apply(trigger, data, now, state.state, state.deadline_us)
        return state

    async def _create_shares(self, live: LiveTask, shares: tuple[tuple[str, str, int | None, int | None], ...]) -> None:
        rec = live.rec

        async def create(ct_id: str, site: str, hop: int | None, deadline: int | None) -> None:
            data: dict[str, Any] = {"task_id": rec.task_id, "site": site}
            if hop is not None:
                data["hop"] = hop
            if deadline is not None:
                data["task_assignment_timeout"] = rec.task_assignment_timeout
            try:
                state = await self.runtime.create_async("client_task", machine_id=ct_id, data=data, site=site,
                                                        job_id=rec.job_id, round=rec.round, deadline_us=deadline)
            except ConcurrencyConflict:
                existing = load_share(self.recorder, ct_id, site, hop)  # created before a crash
                if existing is not None:
                    rec.add(existing)
                return
            share = ClientTaskRecord(ct_id, site, hop)
            share.state, share.deadline_us = state.state, state.deadline_us
            rec.add(share)

        await asyncio.gather(*(create(*s) for s in shares))
        self._work_changed()

    async def _fail(self, live: LiveTask, reason: str) -> None:
        async with live.lock:
            if not live.ending and live.rec.standing:
                await self._end_locked(live, "fail", {"reason": reason})
        await self._deliver(live)

    async def _end_locked(self, live: LiveTask, trigger: str, data: dict[str, Any]) -> None:
        live.ending = True
        try:
            await self._fire_task(live, trigger, data)
        except BaseException:
            live.ending = False
            raise
        self._timer_ended(live.rec, self.runtime.get(live.rec.task_id).state)
        await self._finish_locked(live)

    @staticmethod
    def _timer_ended(rec: TaskRecord, state: str) -> None:
        # the engine's timer fires only timeout (standing) and wait_elapsed (min_received)
        if rec.standing and state != rec.state:
            rec.state = state
            rec.reason = "timeout" if state == "timed_out" else "wait_elapsed"

    async def _finish_locked(self, live: LiveTask) -> None:
        """Close the open shares, drop the task from the standing list, fix its outcome."""
        if live.finished:
            return
        rec = live.rec
        live.ending = True
        timed_out = rec.state == "timed_out"
        await asyncio.gather(*(self._close_share(rec, share, timed_out) for share in list(rec.cts.values())
                               if share.live))
        live.finished = True
        if live in self._standing:
            self._standing.remove(live)
        live.outcome = self._outcome(rec)
        self._finished.append(rec.task_id)
        while len(self._finished) > self._keep_finished:
            old = self._tasks.get(self._finished.popleft())
            if old is not None and old.delivered:
                del self._tasks[old.rec.task_id]

    async def _close_share(self, rec: TaskRecord, share: ClientTaskRecord, timed_out: bool) -> None:
        trigger = "timeout" if timed_out else "site_dead" if self.sites.is_dead(share.site) else "cancel"
        await self._fire_share(rec, share, trigger, {"reason": f"task_{rec.state}"})

    async def _close_orphan(self, ct_id: str, site: str | None) -> int:
        try:
            task_state = self.runtime.get(task_id_of(ct_id)).state
        except UnknownMachine:
            task_state = "cancelled"
        trigger = ("timeout" if task_state == "timed_out"
                   else "site_dead" if site is not None and self.sites.is_dead(site) else "cancel")
        try:
            await self.runtime.fire_async(ct_id, trigger, {"reason": f"task_{task_state}"})
        except REJECTED:
            return 0
        return 1

    def _outcome(self, rec: TaskRecord) -> TaskOutcome:
        status = status_of_state(rec.state) or TaskCompletionStatus.ERROR
        results = tuple(TaskResult(s.site, s.ct_id, s.result, s.hop)
                        for s in rec.shares() if s.state == "result_received")
        return TaskOutcome(rec.task_id, rec.name, status, results, rec.reason or status.value)

    async def _deliver(self, live: LiveTask) -> None:
        """Once the task is over: tell its Task object, run task_done_cb, wake waiters (once)."""
        if not live.finished or live.delivered:
            return
        live.delivered = True
        if live.task is not None:
            await self._deliver_to(live.task, live)
        live.done.set()

    async def _deliver_to(self, task: Task, live: LiveTask) -> None:
        assert live.outcome is not None
        task.completion_status = live.outcome.status
        task.outcome = live.outcome
        if task.task_done_cb is not None:
            try:
                await _call(task.task_done_cb, task)
            except Exception:
                logger.exception("task_done_cb of task %s failed", live.rec.task_id)

    # -- cache ----------------------------------------------------------------------------

    def _load(self, task_id: str) -> LiveTask | None:
        found = load_task(self.recorder, task_id) if isinstance(task_id, str) and task_id else None
        if isinstance(found, Unscheduled):
            self._unscheduled[task_id] = found
        return self._adopt(found) if isinstance(found, TaskRecord) else None

    def _adopt(self, rec: TaskRecord) -> LiveTask:
        live = LiveTask(rec)
        self._tasks[rec.task_id] = live
        if rec.standing:
            keys = [other.rec.schedule_seq for other in self._standing]
            self._standing.insert(bisect.bisect_right(keys, rec.schedule_seq), live)
            self._bridge.post(("task", rec.task_id))  # bring it up to date with the clock
        else:
            live.finished = live.delivered = True
            live.outcome = self._outcome(rec)
            live.done.set()
            self._finished.append(rec.task_id)
        return live

    async def _attach(self, live: LiveTask, task: Task) -> None:
        """A replayed controller scheduled a recorded task again: bind its callbacks."""
        if live.task is not None and live.task is not task:
            raise TaskError("task_id", f"task {live.rec.task_id!r} is already scheduled by another Task object")
        live.task = task
        task.task_id = live.rec.task_id
        if live.finished:
            await self._deliver_to(task, live)  # its task_done_cb runs now, once for this object

    # -- effects and alarms (handed over from the timer thread) -----------------------------

    def _task_effect(self, _rt: Runtime, _event: StoredEvent, state: MachineState, _redriven: bool) -> None:
        self._bridge.post(("task", state.machine_id))

    def _share_effect(self, _rt: Runtime, event: StoredEvent, state: MachineState, _redriven: bool) -> None:
        self._bridge.post(("share_timed_out", state.machine_id, event.data, event.ts_us))

    def _site_effect(self, _rt: Runtime, event: StoredEvent, state: MachineState, _redriven: bool) -> None:
        self._bridge.post(("site", state.site or state.machine_id.split(":", 1)[-1], event.trigger, event.data))

    async def _handle(self, item: Item) -> None:
        kind = item[0]
        if kind == "task":
            live = self._tasks.get(item[1])
            if live is not None and not live.finished:
                await self._evaluate(live)
        elif kind == "share_timed_out":
            live = self._tasks.get(task_id_of(item[1]))
            share = None if live is None else live.rec.cts.get(item[1])
            if live is not None and share is not None:
                if share.live:
                    share.apply("timeout", item[2], item[3], "timed_out", None)
                if not live.finished:
                    await self._evaluate(live)
        elif kind == "site":
            site = item[1]
            if self.sites.refresh(site) == "missing":
                await self.sites.went_missing(site, item[2], item[3])
        elif kind == "site_dead":
            for live in list(self._standing):
                if item[1] in live.rec.targets:
                    await self._evaluate(live)

    async def _alarm(self, task_id: str) -> None:
        live = self._tasks.get(task_id)
        if live is not None and not live.finished:
            await self._evaluate(live)

    def _site_changed(self, site: str, state: str) -> None:
        if state == "dead":
            self._bridge.post(("site_dead", site))
        for listener in list(self._site_listeners):
            try:
                listener(site, state)
            except Exception:
                logger.exception("site listener failed for %s -> %s", site, state)
