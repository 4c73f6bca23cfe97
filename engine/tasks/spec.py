"""Value types of the task API (the reference's ``WFCommSpec`` shapes) and its errors.

A ``Task`` is what a controller builds and hands to the ``TaskManager``: a name, JSON
data and props, a timeout and three optional callbacks. The manager writes the
scheduling event (which fixes the data the sites get: edits made to ``task.data``
after scheduling are not seen; ``before_task_sent_cb`` may change what one site gets,
and a relay's ``result_received_cb`` what the next hop gets) and sets ``task_id``,
``completion_status`` and ``outcome`` on the object as the task lives.

Callbacks run on the manager's event loop and may be plain functions or coroutine
functions::

    before_task_sent_cb(view: ClientTaskView)  # may set view.data (what this site gets)
    result_received_cb(view: ClientTaskView)   # may set view.result, and view.next_data (relay)
    task_done_cb(task: Task)                   # task.completion_status and task.outcome are set

Errors: ``TaskError`` (``.argument``: the scheduling argument or submitted value that
cannot be used), defined in ``engine.errors`` with the rest of the tree.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import orjson

from engine.errors import TaskError

__all__ = [
    "BROADCAST",
    "METHODS",
    "RELAY",
    "SEND",
    "ClientTaskInfo",
    "ClientTaskView",
    "SendOrder",
    "SubmissionOutcome",
    "Task",
    "TaskAssignment",
    "TaskCompletionStatus",
    "TaskError",
    "TaskOutcome",
    "TaskResult",
    "as_json",
    "check_seconds",
    "status_of_state",
    "trigger_of_status",
]

BROADCAST = "broadcast"
SEND = "send"
RELAY = "relay"
#: the scheduling triggers of the task chart, one per method
METHODS = (BROADCAST, SEND, RELAY)


class TaskCompletionStatus(StrEnum):
    """How a task ended (the reference's statuses; each is a terminal state of the task chart)."""

    OK = "ok"
    TIMEOUT = "timeout"
    ERROR = "error"
    CANCELLED = "cancelled"
    ABORTED = "aborted"
    CLIENT_DEAD = "client_dead"


class SendOrder(StrEnum):
    """Which target may take a ``send`` (or ``relay``) task next."""

    SEQUENTIAL = "sequential"
    ANY = "any"


class SubmissionOutcome(StrEnum):
    """What ``process_submission`` did with a result; only ``ACCEPTED`` counts."""

    ACCEPTED = "accepted"
    #: the site's share had already ended (skipped hop, task over, site timed out)
    LATE = "late"
    #: the site's result for this assignment was already accepted
    DUPLICATE = "duplicate"
    #: the assignment belongs to another site
    WRONG_SITE = "wrong_site"
    #: no such task or assignment (or one never handed out)
    UNKNOWN_TASK = "unknown_task"


_STATE_OF_STATUS = {
    TaskCompletionStatus.OK: "completed",
    TaskCompletionStatus.TIMEOUT: "timed_out",
    TaskCompletionStatus.ERROR: "errored",
    TaskCompletionStatus.CANCELLED: "cancelled",
    TaskCompletionStatus.ABORTED: "aborted",
    TaskCompletionStatus.CLIENT_DEAD: "client_dead",
}
_STATUS_OF_STATE = {state: status for status, state in _STATE_OF_STATUS.items()}
_TRIGGER_OF_STATUS = {
    TaskCompletionStatus.OK: "complete",
    TaskCompletionStatus.TIMEOUT: "timeout",
    TaskCompletionStatus.ERROR: "fail",
    TaskCompletionStatus.CANCELLED: "cancel",
    TaskCompletionStatus.ABORTED: "abort",
    TaskCompletionStatus.CLIENT_DEAD: "targets_dead",
}


def status_of_state(state: str) -> TaskCompletionStatus | None:
    """The completion status a task chart state stands for (None while the task is not over)."""
    return _STATUS_OF_STATE.get(state)


def trigger_of_status(status: TaskCompletionStatus) -> str:
    """The task chart trigger that ends a task with ``status``."""
    return _TRIGGER_OF_STATUS[status]


def as_json(value: Any, argument: str) -> Any:
    """``value`` as the log will hand it back (a JSON round trip), or TaskError naming ``argument``.

    Tuples become lists and so on, so a result seen live and the same result read
    back after a restart are equal.
    """
    try:
        return orjson.loads(orjson.dumps(value))
    except TypeError as exc:  # orjson.JSONEncodeError is a TypeError
        raise TaskError(argument, f"must be JSON (str keys, finite numbers): {exc}") from None


def check_seconds(value: Any, argument: str) -> float:
    """A non-negative, finite number of seconds, or TaskError naming ``argument``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise TaskError(argument, f"must be a number of seconds >= 0, got {value!r}")
    return float(value)


BeforeSent = Callable[["ClientTaskView"], Awaitable[Any] | Any]
ResultReceived = Callable[["ClientTaskView"], Awaitable[Any] | Any]
TaskDone = Callable[["Task"], Awaitable[Any] | Any]


@dataclass(eq=False)
class Task:
    """A unit of work for sites: the reference's ``Task(name, data, props, timeout, callbacks)``.

    ``timeout`` is in seconds from scheduling (0: none) and is inclusive: a task whose
    timeout has exactly elapsed is TIMEOUT. ``data`` and ``props`` must be JSON. A task
    object is scheduled once; scheduling it again is a ``TaskError``.
    """

    name: str
    data: Any = None
    props: dict[str, Any] = field(default_factory=dict)
    timeout: float = 0
    before_task_sent_cb: BeforeSent | None = None
    result_received_cb: ResultReceived | None = None
    task_done_cb: TaskDone | None = None
    #: set by the manager when the task is scheduled
    task_id: str | None = None
    #: set by the manager when the task is over (before task_done_cb runs)
    completion_status: TaskCompletionStatus | None = None
    outcome: TaskOutcome | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise TaskError("task.name", f"must be a non-empty string, got {self.name!r}")
        if not isinstance(self.props, dict):
            raise TaskError("task.props", f"must be a dict, got {type(self.props).__name__}")
        self.timeout = check_seconds(self.timeout, "task.timeout")
        for name in ("before_task_sent_cb", "result_received_cb", "task_done_cb"):
            cb = getattr(self, name)
            if cb is not None and not callable(cb):
                raise TaskError(f"task.{name}", f"must be callable, got {cb!r}")


@dataclass
class ClientTaskView:
    """One site's share of a task as the callbacks see it (the reference's ``ClientTask``).

    ``before_task_sent_cb`` may replace ``data`` (what this site is sent; recorded in
    the send event). ``result_received_cb`` may replace ``result`` (what is recorded
    and counted) and, for a relay, ``next_data`` (what the next hop is sent; recorded
    too). Anything assigned must be JSON.
    """

    task: Task | None
    task_id: str
    client_task_id: str
    name: str
    site: str
    #: relay hop, SEQUENTIAL send slot or broadcast_forever round of this share (None: broadcast, ANY send)
    hop: int | None
    data: Any
    props: dict[str, Any]
    #: how many times the assignment was handed out before this one (0 on the first send)
    send_count: int = 0
    result: Any = None
    next_data: Any = None


@dataclass(frozen=True, slots=True)
class TaskAssignment:
    """What ``process_task_request`` hands a site: the task to run, durable before it is returned.

    ``resend`` is true when the site already had this assignment and asked again: the
    same assignment, counted (``send_count``), never a new dispatch.
    """

    task_id: str
    client_task_id: str
    name: str
    site: str
    data: Any
    props: dict[str, Any]
    resend: bool
    send_count: int
    hop: int | None = None
    #: the job the task belongs to (None for tasks scheduled without one)
    job_id: str | None = None


@dataclass(frozen=True, slots=True)
class TaskResult:
    """One accepted result, as the log records it (after ``result_received_cb``)."""

    site: str
    client_task_id: str
    result: Any
    #: relay hop, SEQUENTIAL send slot or broadcast_forever round (None: broadcast, ANY send)
    hop: int | None = None


@dataclass(frozen=True, slots=True)
class TaskOutcome:
    """How a task ended and the results it accepted, in a deterministic order.

    Results are in target order (broadcast, send), hop order (relay), or target order
    then round (broadcast_forever), never in arrival order, so a replayed controller
    folds them the same way.
    """

    task_id: str
    name: str
    status: TaskCompletionStatus
    results: tuple[TaskResult, ...]
    #: why the task ended, as recorded in its terminal event ("all_answered", "timeout", ...)
    reason: str | None = None

    @property
    def result(self) -> Any:
        """The last result (a relay's final hop; a send's only result), or None if there is none."""
        return self.results[-1].result if self.results else None

    def by_site(self) -> dict[str, Any]:
        """Results keyed by site (a site with several results keeps its last)."""
        return {r.site: r.result for r in self.results}


@dataclass(frozen=True, slots=True)
class ClientTaskInfo:
    """Answer to ``process_task_check``: where one of the asking site's assignments stands."""

    task_id: str
    client_task_id: str
    site: str
    #: the client_task chart state (assigned, sent, result_received, timed_out, ...)
    state: str
    #: the task chart state (standing, min_received, completed, ...)
    task_state: str
    send_count: int

    @property
    def active(self) -> bool:
        """True while the site should keep working on it (sent, and the task still stands)."""
        return self.state == "sent" and self.task_state in ("standing", "min_received")
