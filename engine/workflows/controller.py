"""The controller a workflow function receives, and how it replays a run from the log.

A workflow is plain synchronous Python run in a thread of its own. Each blocking
``ctl`` method hands its work to the ``TaskManager``'s event loop
(``asyncio.run_coroutine_threadsafe``) and waits for it.

**Calls and replay.** Every controller call that schedules a task or records a
value takes the next number ``i`` of one counter (from 1): a task call schedules
task ``<job_id>.t<i>``; ``now``, ``publish``, ``checkpoint`` and
``get_num_standing_tasks`` append a ``record`` event ``{"call": i, "op": ..., "value":
...}`` to the run's ``workflow`` machine (``<job_id>.workflow``). After a restart the
runner runs the workflow again from the top: a record call whose index is recorded
returns the recorded value at once; a task call whose id is recorded re-attaches to
that task (the manager returns a finished task's recorded outcome, or waits for a
standing one). A call of another kind than the log holds at its index, or a task
scheduled with other arguments, raises ``NondeterminismError`` naming the call
(index, op, arguments) and the recorded event (seq, op). So does a workflow that
returns while the log still holds later calls. Time and randomness come only from
``ctl.now()`` and ``ctl.random()``; ``ctl.logger`` is silent while calls are being
replayed.

**Checkpoints bound replay.** ``ctl.checkpoint(state)`` records JSON state at call
``k``. ``ctl.resume_point()`` made as the workflow's first call returns None on a
fresh run; after a restart it returns the last recorded checkpoint's state and moves
the counter to ``k``, so the next call is ``k + 1``: the calls before the checkpoint
are never made again (no task is re-attached, no value compared) and replay costs
the calls made since the last checkpoint, plus one read of the workflow machine's
own events. Made later in a run, ``resume_point()`` returns the last checkpoint at or
before the current call, live or replayed alike. A workflow that never calls it is
replayed from call 1. ``ctl.random()`` is re-seeded from (job id, k) at every
checkpoint, so a run resumed at a checkpoint draws the same numbers as the original.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import inspect
import logging
import os
import random
import threading
from collections.abc import Coroutine, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from engine import faults
from engine.errors import EngineError, NondeterminismError, TaskError
from engine.log.recorder import EventRecorder
from engine.tasks import ClientTaskView, Task, TaskCompletionStatus, TaskManager, TaskOutcome
from engine.tasks.spec import BROADCAST, METHODS, RELAY, SEND, SendOrder, as_json
from engine.tensors import DEFAULT_CHUNK_SIZE, pack, ref, ref_digest, refs_in, replace_refs
from engine.tensors import load as tensor_load
from engine.tensors import store as tensor_store

__all__ = [
    "KIND",
    "OPS",
    "Controller",
    "Recorded",
    "ReplayLog",
    "TaskHandle",
    "load_replay_log",
    "task_id_for",
    "workflow_machine_id",
]

T = TypeVar("T")

#: the chart kind of a workflow run
KIND = "workflow"
#: ops of ``record`` events
OPS = ("now", "publish", "checkpoint", "standing")
#: the name of the logger ``ctl.logger`` wraps
USER_LOGGER = "engine.workflows.user"


def workflow_machine_id(job_id: str) -> str:
    """The id of a job's workflow machine."""
    return f"{job_id}.workflow"


def task_id_for(job_id: str, call: int) -> str:
    """The id of the task scheduled by call ``call`` of the job's workflow."""
    return f"{job_id}.t{call}"


def _seed(job_id: str, call: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{job_id}:{call}".encode()).digest()[:8], "big")


def _round_of(task: Task) -> int | None:
    """The round a task belongs to (its data's ``round``), recorded on its machines for the history views."""
    data = task.data
    value = data.get("round") if isinstance(data, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True, slots=True)
class Recorded:
    """A ``record`` event of a workflow machine: call index, op, value and the event's seq."""

    call: int
    op: str
    value: Any
    seq: int


@dataclass(frozen=True, slots=True)
class TaskHandle:
    """What the non-blocking ``broadcast``/``send``/``relay`` return; pass it to ``ctl.wait``."""

    call: int
    task_id: str


@dataclass
class ReplayLog:
    """What the log holds of one workflow run: its records, its tasks and its last checkpoint."""

    records: dict[int, Recorded] = field(default_factory=dict)
    #: call index -> task id of every task the run scheduled
    tasks: dict[int, str] = field(default_factory=dict)
    checkpoint: Recorded | None = None

    @property
    def last_call(self) -> int:
        """The highest recorded call index (0: nothing recorded)."""
        return max([0, *self.records, *self.tasks])


def load_replay_log(recorder: EventRecorder, job_id: str) -> ReplayLog:
    """Read a run's records (its workflow machine's events) and its task ids from the log."""
    log = ReplayLog()
    for event in recorder.read(machine_id=workflow_machine_id(job_id)):
        data = event.data or {}
        if event.trigger != "record":
            continue
        rec = Recorded(int(data["call"]), str(data["op"]), data.get("value"), event.seq)
        log.records[rec.call] = rec
        if rec.op == "checkpoint":
            log.checkpoint = rec
    prefix = f"{job_id}.t"
    for row in recorder.machines(kind="task", job_id=job_id):
        suffix = row.machine_id[len(prefix):]
        if row.machine_id.startswith(prefix) and suffix.isdigit():
            log.tasks[int(suffix)] = row.machine_id
    return log


class _Stopped(BaseException):
    """Unwinds the workflow thread when its runner closes (a simulated or real shutdown).

    A BaseException so that a workflow's ``except Exception`` does not swallow it.
    """


class _ReplayAwareLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """A logger adapter that drops every record while its controller replays recorded calls."""

    def __init__(self, logger: logging.Logger, ctl: Controller) -> None:
        super().__init__(logger, {"job_id": ctl.job_id})
        self._ctl = ctl

    def isEnabledFor(self, level: int) -> bool:  # noqa: N802 - the logging API's name
        """False while replaying, else as the wrapped logger decides."""
        return not self._ctl.replaying and self.logger.isEnabledFor(level)

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        """Tag records with the job id (``extra={"job_id": ...}``)."""
        kwargs.setdefault("extra", {}).update(self.extra or {})
        return msg, kwargs


class Controller:
    """The object a workflow function receives (``def fedavg(ctl, ...)``); see the module docstring.

    Built by ``WorkflowRunner``; its blocking methods must be called from the workflow's
    thread, never from the manager's event loop.
    """

    def __init__(self, manager: TaskManager, loop: asyncio.AbstractEventLoop, *, job_id: str,
                 log: ReplayLog) -> None:
        self.manager = manager
        self.job_id = job_id
        self._loop = loop
        self._log = log
        self._machine_id = workflow_machine_id(job_id)
        self._calls = 0
        self._replayed = 0
        self._last_state: Any = None
        self._rng = random.Random(_seed(job_id, 0))
        self._lock = threading.Lock()
        self._inflight: set[concurrent.futures.Future[Any]] = set()
        #: payloads being read ahead of ``load_tensors`` (see ``prefetching``): (digest, arrays) -> future
        self._prefetched: dict[tuple[str, bool], concurrent.futures.Future[Any]] = {}
        self._prefetcher: concurrent.futures.ThreadPoolExecutor | None = None
        self._stopping = False
        self._aborted: str | None = None
        #: task waits begun so far, and whether one is under way (read on the loop)
        self.waits = 0
        self.waiting = False
        self.changed = asyncio.Event()
        self.logger: logging.LoggerAdapter = _ReplayAwareLogger(  # type: ignore[type-arg]
            logging.getLogger(USER_LOGGER), self)

    # -- state -----------------------------------------------------------------------

    @property
    def replaying(self) -> bool:
        """True while the next call's outcome is already recorded."""
        return self._calls < self._log.last_call

    @property
    def calls(self) -> int:
        """The index of the last call made (0: none yet)."""
        return self._calls

    @property
    def replayed_calls(self) -> int:
        """How many calls of this run returned (or re-attached to) something recorded."""
        return self._replayed

    # -- plumbing ----------------------------------------------------------------------

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the manager's loop and wait for it (from the workflow thread)."""
        with self._lock:
            if self._stopping:
                coro.close()
                raise _Stopped
            future = asyncio.run_coroutine_threadsafe(coro, self._loop)
            self._inflight.add(future)
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            if self._stopping:
                raise _Stopped from None
            raise
        finally:
            with self._lock:
                self._inflight.discard(future)

    def stop(self) -> None:
        """Make the workflow thread unwind at its next (or current) controller call."""
        with self._lock:
            self._stopping = True
            for future in self._inflight:
                future.cancel()
        self.close()

    def close(self) -> None:
        """Let go of payloads read ahead and of the thread reading them (the workflow is over)."""
        with self._lock:
            prefetcher, self._prefetcher, self._prefetched = self._prefetcher, None, {}
        if prefetcher is not None:
            prefetcher.shutdown(wait=False, cancel_futures=True)

    def mark_aborted(self, reason: str) -> None:
        """Make every later controller call raise (the job was aborted)."""
        self._aborted = reason

    def _next(self) -> int:
        if self._stopping:
            raise _Stopped
        if self._aborted is not None:
            raise EngineError(f"the workflow of job {self.job_id!r} was aborted: {self._aborted}")
        self._calls += 1
        return self._calls

    def _describe_task(self, task_id: str) -> str:
        """The recorded scheduling event of ``task_id`` as "event seq N: method of task ..."."""
        for event in self.manager.recorder.read(machine_id=task_id):
            if event.trigger in METHODS:
                return f"event seq {event.seq}: {event.trigger} of task {task_id!r}"
        return f"task {task_id!r} (created, never scheduled)"

    def _diverged(self, i: int, call: str, recorded: str) -> NondeterminismError:
        return NondeterminismError(f"call {i} {call}", recorded)

    # -- recorded values ---------------------------------------------------------------------

    def _record(self, op: str, call: str, value: Any = None, *, live: bool = False,
                round: int | None = None) -> Any:
        """Make record call ``op``: replay its recorded value or compute, record and return it."""
        i = self._next()
        rec = self._log.records.get(i)
        if rec is not None:
            if rec.op != op:
                raise self._diverged(i, call, f"event seq {rec.seq}: {rec.op} (call {i})")
            if op in ("publish", "checkpoint") and rec.value != value:
                raise self._diverged(i, call, f"event seq {rec.seq}: {rec.op} of {_short(rec.value)} (call {i})")
            self._replayed += 1
            return rec.value
        if i in self._log.tasks:
            tid = self._log.tasks[i]
            raise self._diverged(i, call, self._run(self._on_loop(self._describe_task, tid)))

        async def append() -> Any:
            recorded = value
            if live and op == "now":
                recorded = self.manager.clock.now_us()
            elif live and op == "standing":
                recorded = self.manager.get_num_standing_tasks(self.job_id)
            await self.manager.runtime.fire_async(self._machine_id, "record",
                                                  {"call": i, "op": op, "value": recorded}, round=round)
            return recorded

        return self._run(append())

    @staticmethod
    async def _on_loop(fn: Any, *args: Any) -> Any:
        return fn(*args)

    def now(self) -> int:
        """The time (integer microseconds UTC) at this call, as first recorded: replay returns the same."""
        return int(self._record("now", "now()", live=True))

    def get_num_standing_tasks(self) -> int:
        """How many of the job's tasks stand, as first recorded (replay returns the same count)."""
        return int(self._record("standing", "get_num_standing_tasks()", live=True))

    def publish(self, value: Any, *, round: int | None = None) -> None:
        """Record a small JSON result (of ``round``) in the log; replay checks it is the same."""
        value = as_json(value, "value")
        if faults.armed() and not self.replaying:
            faults.maybe_crash(round, "aggregate")
        self._record("publish", f"publish({_short(value)}, round={round})", value, round=round)

    def put_tensors(self, payload: Any, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> dict[str, str]:
        """Store a payload holding tensors in the server's chunk store; return its JSON reference.

        The reference (``{"$tensors": "<manifest address>"}``) is what task data and
        published values carry. Storing is idempotent and the address depends only on the
        content, so a replayed workflow gets the same reference.
        """
        return ref(tensor_store(pack(payload, chunk_size=chunk_size), self._chunks()))

    def load_tensors(self, value: Any, *, arrays: bool = False) -> Any:
        """``value`` with every tensor reference replaced by its payload, read (verified) from the store.

        ``arrays``: numpy arrays where numpy has the dtypes (aggregation without torch).
        Payloads a ``prefetching`` task already read are taken from there; the rest of
        what was read ahead is let go (a round's results are loaded once).
        """
        chunks = self._chunks()
        with self._lock:
            ahead, self._prefetched = self._prefetched, {}
        digests = refs_in(value)
        loaded: dict[str, Any] = {}
        rest = []
        for digest in digests:
            future = ahead.get((digest, arrays))
            if future is not None:
                try:
                    loaded[digest] = future.result()
                    continue
                except Exception:  # noqa: BLE001 - read it again here, where a failure is the caller's
                    pass
            rest.append(digest)
        if len(rest) == 1:
            loaded[rest[0]] = tensor_load(chunks, rest[0], arrays=arrays)
        elif rest:
            # several payloads (a round's results): read and verified on the machine's cores at once
            with concurrent.futures.ThreadPoolExecutor(max_workers=min(len(rest), os.cpu_count() or 1, 8)) as pool:
                loaded.update(zip(rest, pool.map(lambda d: tensor_load(chunks, d, arrays=arrays), rest),
                                  strict=True))
        return replace_refs(value, loaded.__getitem__)

    def prefetching(self, task: Task, *, arrays: bool = False) -> Task:
        """``task``, set to read each site's result payloads as the result arrives.

        The reads run on threads of their own while the other sites are still training
        or uploading, so the ``load_tensors`` of the outcome finds them done instead of
        reading a whole round's results after the last one came in. Only what the
        result references is read, verified as always, and the bytes are the same either
        way: a restarted (replayed) workflow, which receives no callbacks for results
        recorded before, loads them in ``load_tensors`` with the same outcome. A
        ``result_received_cb`` the task already has runs first.
        """
        chunks = self._chunks()
        user_cb = task.result_received_cb

        async def received(view: ClientTaskView) -> None:
            if user_cb is not None:
                outcome = user_cb(view)
                if inspect.isawaitable(outcome):
                    await outcome
            for digest in refs_in(view.result):
                with self._lock:
                    if self._prefetcher is None:
                        self._prefetcher = concurrent.futures.ThreadPoolExecutor(
                            max_workers=2, thread_name_prefix="fedlog-prefetch")
                    if (digest, arrays) not in self._prefetched:
                        self._prefetched[(digest, arrays)] = self._prefetcher.submit(
                            tensor_load, chunks, digest, arrays=arrays)

        task.result_received_cb = received
        return task

    def make_tensors(self, fn: str, kwargs: dict[str, Any] | None = None) -> dict[str, str]:
        """Store the payload ``fn(**kwargs)`` returns (``package.module:function``); return its reference.

        When torch is not loaded in this process the function runs in a child process
        (``engine.workflows.isolated``): building a model needs torch, the server does not.
        """
        from engine.workflows.isolated import make_payload

        return ref(make_payload(fn, kwargs or {}, self._chunks()))

    def call_on_tensors(self, fn: str, value: Any) -> Any:
        """JSON ``fn(payload)`` for a stored payload (e.g. evaluating a model), isolated like ``make_tensors``."""
        from engine.workflows.isolated import call_on_payload

        digest = ref_digest(value)
        if digest is None:
            raise EngineError(f"call_on_tensors needs a tensor reference, got {_short(value)}")
        return call_on_payload(fn, digest, self._chunks())

    def _chunks(self) -> Any:
        store = getattr(self.manager, "chunk_store", None)
        if store is None:
            raise EngineError("this controller's task manager has no chunk store (tensor payloads need a server)")
        return store

    def checkpoint(self, state: Any) -> None:
        """Record JSON ``state``: after a restart ``resume_point()`` returns it and replay starts here."""
        state = as_json(state, "state")
        self._record("checkpoint", f"checkpoint({_short(state)})", state)
        self._last_state = state
        self._rng.seed(_seed(self.job_id, self._calls))

    def resume_point(self) -> Any:
        """The last checkpointed state (None if none); as the first call after a restart, jump to it.

        Not a numbered call: it records nothing.
        """
        cp = self._log.checkpoint
        if self._calls == 0 and cp is not None:
            self._calls = cp.call
            self._last_state = cp.value
            self._rng.seed(_seed(self.job_id, cp.call))
        return self._last_state

    def random(self) -> random.Random:
        """The run's random generator, seeded from the job id (re-seeded at each checkpoint)."""
        return self._rng

    # -- tasks ---------------------------------------------------------------------------

    def _schedule(self, op: str, task: Task, method: str, kw: Mapping[str, Any]) -> TaskHandle:
        i = self._next()
        args = ", ".join(f"{k}={_short(v, 40)}" for k, v in kw.items() if v not in (None, 0, 0.0))
        call = f"{op}({task.name!r}{', ' if args else ''}{args})"
        rec = self._log.records.get(i)
        if rec is not None:
            raise self._diverged(i, call, f"event seq {rec.seq}: {rec.op} (call {i})")
        tid = task_id_for(self.job_id, i)
        if i in self._log.tasks:
            self._replayed += 1

        async def schedule() -> str:
            try:
                return await self.manager.schedule(task, method=method, task_id=tid, job_id=self.job_id,
                                                   round=_round_of(task), **kw)
            except NondeterminismError as exc:
                raise self._diverged(i, call, f"{self._describe_task(tid)} ({exc.recorded})") from None

        self._run(schedule())
        return TaskHandle(i, tid)

    def wait(self, handle: TaskHandle) -> TaskOutcome:
        """Block until the task of ``handle`` is over; return its outcome (recorded ones at once)."""
        handle = check_handle(handle)
        if self._stopping:
            raise _Stopped

        async def wait() -> TaskOutcome:
            self.waits += 1
            self.waiting = True
            self.changed.set()
            try:
                return await self.manager.wait(handle.task_id)
            finally:
                self.waiting = False

        return self._run(wait())

    def broadcast(self, task: Task, targets: list[str] | None = None, min_responses: int = 0,
                  wait_time_after_min_received: float = 0) -> TaskHandle:
        """Schedule ``task`` for every target (None: the registered sites); do not wait."""
        return self._schedule("broadcast", task, BROADCAST, {
            "targets": targets, "min_responses": min_responses,
            "wait_time_after_min_received": wait_time_after_min_received})

    def broadcast_and_wait(self, task: Task, targets: list[str] | None = None, min_responses: int = 0,
                           wait_time_after_min_received: float = 0) -> TaskOutcome:
        """``broadcast`` then ``wait``."""
        return self.wait(self._schedule("broadcast_and_wait", task, BROADCAST, {
            "targets": targets, "min_responses": min_responses,
            "wait_time_after_min_received": wait_time_after_min_received}))

    def send(self, task: Task, targets: list[str] | None = None, send_order: SendOrder = SendOrder.SEQUENTIAL,
             task_assignment_timeout: float = 0) -> TaskHandle:
        """Schedule ``task`` for one of the targets; do not wait."""
        return self._schedule("send", task, SEND, {
            "targets": targets, "send_order": send_order, "task_assignment_timeout": task_assignment_timeout})

    def send_and_wait(self, task: Task, targets: list[str] | None = None,
                      send_order: SendOrder = SendOrder.SEQUENTIAL, task_assignment_timeout: float = 0) -> TaskOutcome:
        """``send`` then ``wait``."""
        return self.wait(self._schedule("send_and_wait", task, SEND, {
            "targets": targets, "send_order": send_order, "task_assignment_timeout": task_assignment_timeout}))

    def relay(self, task: Task, targets: list[str] | None = None, task_assignment_timeout: float = 0,
              task_result_timeout: float = 0, dynamic_targets: bool = True) -> TaskHandle:
        """Schedule ``task`` through the targets in turn (each hop's result feeds the next); do not wait."""
        return self._schedule("relay", task, RELAY, {
            "targets": targets, "task_assignment_timeout": task_assignment_timeout,
            "task_result_timeout": task_result_timeout, "dynamic_targets": dynamic_targets})

    def relay_and_wait(self, task: Task, targets: list[str] | None = None, task_assignment_timeout: float = 0,
                       task_result_timeout: float = 0, dynamic_targets: bool = True) -> TaskOutcome:
        """``relay`` then ``wait``."""
        return self.wait(self._schedule("relay_and_wait", task, RELAY, {
            "targets": targets, "task_assignment_timeout": task_assignment_timeout,
            "task_result_timeout": task_result_timeout, "dynamic_targets": dynamic_targets}))

    def cancel_task(self, handle: TaskHandle,
                    completion_status: TaskCompletionStatus = TaskCompletionStatus.CANCELLED) -> None:
        """End the task of ``handle`` if it still stands.

        Returns nothing: whether it still stood differs between a run and its replay.
        """
        handle = check_handle(handle)
        if self._stopping:
            raise _Stopped
        self._run(self.manager.cancel_task(handle.task_id, completion_status, reason="workflow cancel_task"))

    def cancel_all_tasks(self, completion_status: TaskCompletionStatus = TaskCompletionStatus.CANCELLED) -> None:
        """End every standing task of this job (returns nothing, as ``cancel_task``)."""
        if self._stopping:
            raise _Stopped
        self._run(self.manager.cancel_all_tasks(completion_status, job_id=self.job_id,
                                                reason="workflow cancel_all_tasks"))

    def check_replay_complete(self) -> None:
        """Raise ``NondeterminismError`` if the workflow returned while the log holds later calls."""
        later = [c for c in (*self._log.records, *self._log.tasks) if c > self._calls]
        if not later:
            return
        i = min(later)
        rec = self._log.records.get(i)
        recorded = (f"event seq {rec.seq}: {rec.op} (call {i})" if rec is not None
                    else self._run(self._on_loop(self._describe_task, self._log.tasks[i])))
        raise NondeterminismError(f"return after call {self._calls}", recorded)


def check_handle(handle: Any) -> TaskHandle:
    """``handle`` if it is a TaskHandle, else TaskError."""
    if not isinstance(handle, TaskHandle):
        raise TaskError("handle", f"must be a TaskHandle from ctl.broadcast/send/relay, got {handle!r}")
    return handle
