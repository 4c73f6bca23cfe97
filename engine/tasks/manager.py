"""The server's task API (the reference's ``WFCommSpec``), driven by the event log.

Each task is a ``task`` machine, each share a ``client_task`` machine, each site a
``site`` machine; ``TaskManager`` keeps in-memory indexes of them (standing tasks in
schedule order, shares per task) that are caches of the log and are rebuilt by
``recover``. It runs on the server's asyncio loop: every change is an event made
durable with ``fire_async`` before anything it causes (an assignment returned, a
callback run). The runtime's timer thread fires state timeouts (a task's timeout,
a broadcast's wait, a relay hop's or SEQUENTIAL slot's deadline, a site's heartbeat
and grace); entry effects hand those back to the loop, where the completion rules
(``engine.tasks.rules``) decide what follows. The rules also read the clock
themselves, so a timer that has not fired yet never lets a share or task outlive
its deadline.

Task data is fixed when the scheduling event is written: edits to ``task.data``
after ``broadcast()``/``send()``/``relay()`` return are not seen (the reference
snapshots broadcast data at the first dispatch; in fedlog the event is the snapshot).
``before_task_sent_cb`` may change what one site gets and a relay's
``result_received_cb`` what the next hop gets; both changes are recorded.

Default task ids are ``<job_id>.t<n>``, n counting this manager's scheduling calls
per job from 1, so a controller replayed from the top after a restart schedules the
same ids and re-attaches to the recorded tasks (a different call under a recorded
id is a ``NondeterminismError``). Pass ``task_id`` to choose ids yourself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine.errors import NondeterminismError, UnknownMachine
from engine.tasks.core import REJECTED, LiveTask, TaskCore
from engine.tasks.records import (
    TaskRecord,
    Unscheduled,
    load_task,
    task_id_of,
)
from engine.tasks.scheduling import build_request, check_task_id, first_difference, resolve_targets
from engine.tasks.sites import check_site
from engine.tasks.spec import (
    BROADCAST,
    RELAY,
    SEND,
    ClientTaskInfo,
    SendOrder,
    SubmissionOutcome,
    Task,
    TaskAssignment,
    TaskCompletionStatus,
    TaskError,
    TaskOutcome,
    as_json,
    trigger_of_status,
)

__all__ = ["TaskManager", "TaskRecovery"]

_DROPPED = (SubmissionOutcome.LATE, SubmissionOutcome.DUPLICATE, SubmissionOutcome.WRONG_SITE)


@dataclass(frozen=True, slots=True)
class TaskRecovery:
    """What ``recover`` rebuilt from the log."""

    standing: int
    unscheduled: int
    shares_closed: int
    sites: int


class TaskManager(TaskCore):
    """Schedules tasks, hands them to sites, takes their results and ends them by the rules.

    Args:
        runtime: the machine runtime over the log (charts task, client_task, site).
        clock: the only source of time (the runtime's clock).
        job_id: default job of scheduled tasks (ids ``<job_id>.t<n>``).
        client_dead_grace: seconds after scheduling before a task whose remaining
            targets are all dead ends CLIENT_DEAD (the reference's 30 s).
        heartbeat_timeout, dead_grace, heartbeat_record_interval: site liveness (see
            ``engine.tasks.sites``).
        keep_finished: how many finished tasks stay cached (older ones reload from the log).
    """

    # -- scheduling -----------------------------------------------------------------

    async def schedule(
        self, task: Task, *, method: str = BROADCAST, targets: list[str] | None = None,
        min_responses: int = 0, wait_time_after_min_received: float = 0,
        send_order: SendOrder = SendOrder.SEQUENTIAL, task_assignment_timeout: float = 0,
        task_result_timeout: float = 0, dynamic_targets: bool = True, forever: bool = False,
        task_id: str | None = None, job_id: str | None = None, round: int | None = None,
    ) -> str:
        """Schedule ``task`` (non-blocking); return its id once the scheduling event is durable.

        ``targets=None`` means the sites registered (and not dead) now; broadcast and
        send drop repeated targets, a relay keeps them. Raises ``TaskError`` naming the
        argument for a bad call (nothing is written), ``NondeterminismError`` when the
        id is recorded with different arguments.
        """
        self._bridge.bind()
        request = build_request(
            task, method=method, targets=targets, min_responses=min_responses,
            wait_time_after_min_received=wait_time_after_min_received, send_order=send_order,
            task_assignment_timeout=task_assignment_timeout, task_result_timeout=task_result_timeout,
            dynamic_targets=dynamic_targets, forever=forever)
        if task.task_id is not None:
            raise TaskError("task", f"this Task was already scheduled as {task.task_id!r}; build a new one")
        job = self.job_id if job_id is None else job_id
        if task_id is None:
            n = self._counters[job] = self._counters.get(job, 0) + 1
            task_id = f"{job}.t{n}" if job else f"t{n}"
        tid = check_task_id(task_id)
        live = self._tasks.get(tid) or self._load(tid)
        if live is not None:
            diff = first_difference(request, live.rec)
            if diff is not None:
                raise NondeterminismError(f"{request.label}({request.name!r}) as task {tid!r}",
                                          f"task {tid!r} was scheduled differently ({diff})")
            await self._attach(live, task)
            return tid
        data = request.schedule_data(resolve_targets(request, self.sites.eligible()))
        if tid not in self._unscheduled:  # one created before a crash and never scheduled is scheduled now
            await self.runtime.create_async("task", machine_id=tid, data={"name": request.name}, job_id=job,
                                            round=round)
        now = self.clock.now_us()
        state = await self.runtime.fire_async(tid, request.method, data)
        self._unscheduled.pop(tid, None)
        rec = TaskRecord.from_schedule(tid, data, ts_us=now, deadline_us=state.deadline_us, job_id=job, round=round)
        live = LiveTask(rec, task=task)
        task.task_id = tid
        self._tasks[tid] = live
        async with live.lock:
            if not await self._evaluate_locked(live):
                self._standing.append(live)
        self._work_changed()
        await self._deliver(live)
        return tid

    async def broadcast(self, task: Task, targets: list[str] | None = None, min_responses: int = 0,
                        wait_time_after_min_received: float = 0, **kw: Any) -> str:
        """Schedule ``task`` for every target; it completes when all answered, or min_responses + wait."""
        return await self.schedule(task, method=BROADCAST, targets=targets, min_responses=min_responses,
                                   wait_time_after_min_received=wait_time_after_min_received, **kw)

    async def broadcast_forever(self, task: Task, targets: list[str] | None = None, **kw: Any) -> str:
        """Schedule a broadcast every target gets on every request, until cancelled or timed out."""
        return await self.schedule(task, method=BROADCAST, targets=targets, forever=True, **kw)

    async def send(self, task: Task, targets: list[str] | None = None,
                   send_order: SendOrder = SendOrder.SEQUENTIAL, task_assignment_timeout: float = 0,
                   **kw: Any) -> str:
        """Schedule ``task`` for one of the targets (ANY: the first to ask; SEQUENTIAL: in turn)."""
        return await self.schedule(task, method=SEND, targets=targets, send_order=send_order,
                                   task_assignment_timeout=task_assignment_timeout, **kw)

    async def relay(self, task: Task, targets: list[str] | None = None,
                    send_order: SendOrder = SendOrder.SEQUENTIAL, task_assignment_timeout: float = 0,
                    task_result_timeout: float = 0, dynamic_targets: bool = True, **kw: Any) -> str:
        """Schedule ``task`` through the targets one after another; the last hop's result completes it."""
        return await self.schedule(task, method=RELAY, targets=targets, send_order=send_order,
                                   task_assignment_timeout=task_assignment_timeout,
                                   task_result_timeout=task_result_timeout, dynamic_targets=dynamic_targets,
                                   **kw)

    async def broadcast_and_wait(self, task: Task, *args: Any, abort_signal: asyncio.Event | None = None,
                                 **kw: Any) -> TaskOutcome:
        """``broadcast`` then ``wait``."""
        return await self.wait(await self.broadcast(task, *args, **kw), abort_signal=abort_signal)

    async def send_and_wait(self, task: Task, *args: Any, abort_signal: asyncio.Event | None = None,
                            **kw: Any) -> TaskOutcome:
        """``send`` then ``wait``."""
        return await self.wait(await self.send(task, *args, **kw), abort_signal=abort_signal)

    async def relay_and_wait(self, task: Task, *args: Any, abort_signal: asyncio.Event | None = None,
                             **kw: Any) -> TaskOutcome:
        """``relay`` then ``wait``."""
        return await self.wait(await self.relay(task, *args, **kw), abort_signal=abort_signal)

    async def wait(self, task_id: str, *, abort_signal: asyncio.Event | None = None) -> TaskOutcome:
        """The task's outcome once it is over and its ``task_done_cb`` ran.

        When ``abort_signal`` is set first, the task is ended ABORTED (as the reference's
        abort signal does) and that outcome is returned. Raises ``UnknownMachine`` for an
        id the log does not hold.
        """
        self._bridge.bind()
        live = self._tasks.get(task_id) or self._load(task_id)
        if live is None:
            if task_id in self._unscheduled:
                raise TaskError("task_id", f"task {task_id!r} was created but never scheduled")
            raise UnknownMachine(task_id)
        if abort_signal is not None and not live.done.is_set():
            done = asyncio.ensure_future(live.done.wait())
            aborted = asyncio.ensure_future(abort_signal.wait())
            try:
                await asyncio.wait([done, aborted], return_when=asyncio.FIRST_COMPLETED)
            finally:
                aborted.cancel()
                done.cancel()
            if not live.done.is_set():
                await self.cancel_task(task_id, TaskCompletionStatus.ABORTED, reason="abort_signal")
        await live.done.wait()
        assert live.outcome is not None
        return live.outcome

    async def cancel_task(self, task: Task | str, completion_status: TaskCompletionStatus =
                          TaskCompletionStatus.CANCELLED, *, reason: str | None = None) -> bool:
        """End a standing task with ``completion_status`` and run its task_done_cb; False if not standing."""
        self._bridge.bind()
        tid = task.task_id if isinstance(task, Task) else task
        status = TaskCompletionStatus(completion_status)
        live = self._tasks.get(tid) if tid is not None else None
        if live is None or live.ending or not live.rec.standing:
            return False
        async with live.lock:
            if live.ending or not live.rec.standing:
                return False
            await self._end_locked(live, trigger_of_status(status), {"reason": reason or "cancel_task"})
        await self._deliver(live)
        return True

    async def cancel_all_tasks(self, completion_status: TaskCompletionStatus = TaskCompletionStatus.CANCELLED,
                               *, job_id: str | None = None, reason: str | None = None) -> int:
        """``cancel_task`` every standing task (of ``job_id``, if given); return how many ended."""
        ended = 0
        for live in list(self._standing):
            if job_id is None or live.rec.job_id == job_id:
                ended += await self.cancel_task(live.rec.task_id, completion_status,
                                                reason=reason or "cancel_all_tasks")
        return ended

    async def abort(self, reason: str = "aborted", *, job_id: str | None = None) -> int:
        """End every standing (and never scheduled) task ABORTED; return how many ended."""
        ended = await self.cancel_all_tasks(TaskCompletionStatus.ABORTED, job_id=job_id, reason=reason)
        for tid in list(self._unscheduled):
            try:
                if job_id is not None and self.runtime.get(tid).job_id != job_id:
                    continue
                await self.runtime.fire_async(tid, "abort", {"reason": reason})
            except (*REJECTED, UnknownMachine):
                continue
            self._unscheduled.pop(tid, None)
            ended += 1
        return ended

    def get_num_standing_tasks(self, job_id: str | None = None) -> int:
        """How many tasks stand (of ``job_id``, if given)."""
        return sum(1 for live in self._standing if job_id is None or live.rec.job_id == job_id)

    def task_progress(self, task_id: str) -> dict[str, Any] | None:
        """A cached task's id, name, state, results received and targets (None if not cached)."""
        live = self._tasks.get(task_id)
        if live is None:
            return None
        rec = live.rec
        received = sum(1 for share in rec.shares() if share.state == "result_received")
        return {"task_id": rec.task_id, "name": rec.name, "state": rec.state, "results": received,
                "targets": list(rec.targets)}

    def standing_task_ids(self) -> list[str]:
        """Ids of the standing tasks, in schedule order."""
        return [live.rec.task_id for live in self._standing]

    # -- the site side ----------------------------------------------------------------

    async def process_task_request(self, site: str) -> TaskAssignment | None:
        """The first standing task (in schedule order) ``site`` may take, durably sent; or None.

        A site that already holds an unanswered assignment of a standing task gets it
        again (``resend``: counted, never a new dispatch). ``before_task_sent_cb`` runs
        before every send and re-send.
        """
        self._bridge.bind()
        check_site(site, "site")
        if await self.sites.contact(site, "task_request") == "removed":
            return None
        for live in list(self._standing):
            rec = live.rec
            if live.ending or not rec.standing:
                continue
            if site not in rec.targets and not (rec.method == RELAY and rec.dynamic_targets):
                continue
            if rec.deadline_us is not None and self.clock.now_us() >= rec.deadline_us:
                await self._evaluate(live)
                continue
            if rec.method == BROADCAST and not rec.forever:
                share = rec.ct_of(site)
                assignment = await self._hand_out(live, share) if share is not None and share.live else None
            else:
                async with live.lock:
                    assignment = await self._offer_locked(live, site)
                await self._deliver(live)
            if assignment is not None:
                return assignment
        return None

    async def process_submission(self, site: str, task_id: str, client_task_id: str,
                                 result: Any) -> SubmissionOutcome:
        """Take a site's result. Only ACCEPTED results count; LATE, DUPLICATE and
        WRONG_SITE results arriving while the task stands are recorded on it (``drop_result``).

        Raises ``TaskError`` when ``result`` is not JSON (nothing is recorded).
        """
        self._bridge.bind()
        check_site(site, "site")
        result = as_json(result, "result")
        await self.sites.contact(site, "submission")
        if not isinstance(task_id, str) or not isinstance(client_task_id, str) or task_id_of(client_task_id) != task_id:
            return SubmissionOutcome.UNKNOWN_TASK
        live = self._tasks.get(task_id) or self._load(task_id)
        share = None if live is None else live.rec.cts.get(client_task_id)
        if live is None or share is None:
            return SubmissionOutcome.UNKNOWN_TASK
        outcome = self._classify(live, share, site)
        if outcome is None:
            now = self.clock.now_us()
            deadlines = (live.rec.deadline_us, share.deadline_us)
            if any(d is not None and now >= d for d in deadlines):
                await self._evaluate(live)
            outcome = self._classify(live, share, site) or await self._accept(live, share, result)
        if outcome in _DROPPED and not live.ending and live.rec.standing:
            await self._drop(live, site, share, outcome)
            await self._evaluate(live)
        return outcome

    async def process_task_check(self, site: str, client_task_id: str) -> ClientTaskInfo | None:
        """Where the site's assignment stands; None if it is unknown or not this site's."""
        self._bridge.bind()
        check_site(site, "site")
        await self.sites.contact(site, "task_check")
        if not isinstance(client_task_id, str):
            return None
        live = self._tasks.get(task_id_of(client_task_id)) or self._load(task_id_of(client_task_id))
        share = None if live is None else live.rec.cts.get(client_task_id)
        if live is None or share is None or share.site != site:
            return None
        now = self.clock.now_us()
        if live.rec.standing and any(d is not None and now >= d for d in (live.rec.deadline_us, share.deadline_us)):
            await self._evaluate(live)
        rec = live.rec
        return ClientTaskInfo(rec.task_id, share.ct_id, site, share.state, rec.state, share.send_count)

    async def process_dead_client_report(self, site: str) -> None:
        """A report that ``site`` is gone: an active site goes missing now; dead after the grace."""
        self._bridge.bind()
        await self.sites.report_dead(check_site(site, "site"), "dead_client_report")

    async def client_is_active(self, site: str, reason: str = "contact") -> str:
        """Any contact from ``site`` (a heartbeat): connect, re-arm or reconnect; return its state."""
        self._bridge.bind()
        return await self.sites.contact(check_site(site, "site"), reason)

    async def heartbeat(self, site: str) -> str:
        """An explicit heartbeat from ``site``."""
        return await self.client_is_active(site, "heartbeat")

    async def register_site(self, site: str) -> str:
        """Make ``site`` known (a target of tasks scheduled with targets=None) before it connects."""
        self._bridge.bind()
        return await self.sites.register(site)

    def site_state(self, site: str) -> str | None:
        """The site's liveness state (registered, active, missing, dead, removed), None if unknown."""
        return self.sites.states.get(site)

    def add_site_listener(self, listener: Callable[[str, str], None]) -> None:
        """Call ``listener(site, state)`` on the loop whenever a site's state changes."""
        self._site_listeners.append(listener)

    # -- lifecycle ----------------------------------------------------------------------

    async def recover(self) -> TaskRecovery:
        """Rebuild the indexes from the log; call it before the runtime's ``recover()``.

        Standing tasks are reloaded in schedule order with their shares (results
        already received count once; open assignments are re-sent as resends); shares
        left open by a task that ended before a crash are closed; then every standing
        task is brought up to date with the clock (overdue hops, slots, timeouts).
        """
        self._bridge.bind()
        self.sites.load()
        loaded: list[TaskRecord] = []
        for row in self.recorder.machines(kind="task", live_only=True):
            if row.machine_id in self._tasks:
                continue
            found = load_task(self.recorder, row.machine_id)
            if isinstance(found, TaskRecord):
                loaded.append(found)
            elif isinstance(found, Unscheduled):
                self._unscheduled[found.task_id] = found
        for rec in sorted(loaded, key=lambda r: r.schedule_seq):
            self._adopt(rec)
        closed = 0
        for row in self.recorder.machines(kind="client_task", live_only=True):
            live = self._tasks.get(task_id_of(row.machine_id))
            if live is None or not live.rec.standing:
                closed += await self._close_orphan(row.machine_id, row.site)
        for live in list(self._standing):
            await self._evaluate(live)
        self._work_changed()
        return TaskRecovery(len(self._standing), len(self._unscheduled), closed, len(self.sites.states))

    def start(self) -> None:
        """Run the manager's own alarms in the background (production); tests call ``run_due_timers``."""
        self._bridge.start()

    async def aclose(self) -> None:
        """Stop the alarms and finish queued work (the runtime and recorder stay open)."""
        await self._bridge.close()

    async def settle(self) -> None:
        """Return once the work handed over by timers and effects so far is done."""
        self._bridge.bind()
        await self._bridge.settle()

    async def run_due_timers(self) -> int:
        """Fire the runtime's due timers and the manager's due alarms, and handle what follows.

        For deterministic drivers and tests (a runtime with ``run_timers=False`` and a
        manual clock). Returns how many timers and alarms ran.
        """
        self._bridge.bind()
        total = 0
        while True:
            ran = await asyncio.to_thread(self.runtime.run_due_timers)
            await self._bridge.settle()
            ran += await self._bridge.run_due_alarms()
            await self._bridge.settle()
            total += ran
            if not ran:
                return total
