"""Checking a scheduling call before anything is written, and resolving its targets.

Every argument is checked (and the task's data made JSON) before the first event,
so a bad call raises ``TaskError`` naming the argument and leaves the log as it was.
Arguments a method does not use are normalised to their defaults, so a replayed
controller that schedules the same task again compares equal to the recorded event.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from engine.tasks.records import TaskRecord
from engine.tasks.sites import check_site
from engine.tasks.spec import (
    BROADCAST,
    METHODS,
    RELAY,
    SEND,
    SendOrder,
    Task,
    TaskError,
    as_json,
    check_seconds,
)

__all__ = ["Request", "build_request", "check_task_id", "first_difference", "resolve_targets"]


@dataclass(frozen=True, slots=True)
class Request:
    """A checked scheduling call (everything but the resolved targets)."""

    method: str
    forever: bool
    name: str
    requested_targets: tuple[str, ...] | None
    min_responses: int
    wait_time_after_min_received: float
    send_order: SendOrder
    task_assignment_timeout: float
    task_result_timeout: float
    dynamic_targets: bool
    timeout: float
    data: Any
    props: dict[str, Any]

    @property
    def label(self) -> str:
        """The API name of the call (``broadcast_forever`` for a forever broadcast)."""
        return "broadcast_forever" if self.forever else self.method

    def schedule_data(self, targets: Sequence[str]) -> dict[str, Any]:
        """The scheduling event's data for these resolved targets."""
        return TaskRecord.schedule_data(
            name=self.name, method=self.method, targets=targets, requested_targets=self.requested_targets,
            min_responses=self.min_responses, wait_time_after_min_received=self.wait_time_after_min_received,
            send_order=self.send_order, task_assignment_timeout=self.task_assignment_timeout,
            task_result_timeout=self.task_result_timeout, dynamic_targets=self.dynamic_targets,
            forever=self.forever, timeout=self.timeout, data=self.data, props=self.props,
        )


def check_task_id(task_id: Any) -> str:
    """A usable task id (no '/': share ids are built from it), else TaskError."""
    if not isinstance(task_id, str) or not task_id or "/" in task_id or len(task_id) > 200:
        raise TaskError("task_id", f"must be a non-empty string of at most 200 characters without '/', got {task_id!r}")
    return task_id


def _check_count(value: Any, argument: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TaskError(argument, f"must be an integer >= 0, got {value!r}")
    return value


def _check_targets(targets: Any) -> tuple[str, ...] | None:
    if targets is None:
        return None
    if isinstance(targets, str) or not isinstance(targets, Sequence):
        raise TaskError("targets", f"must be a list of site names or None, got {targets!r}")
    return tuple(check_site(t, "targets") for t in targets)


def _check_order(send_order: Any) -> SendOrder:
    try:
        return SendOrder(send_order)
    except ValueError:
        raise TaskError("send_order", f"must be SendOrder.SEQUENTIAL or SendOrder.ANY, got {send_order!r}") from None


def build_request(
    task: Task, *, method: str, targets: Any, min_responses: Any, wait_time_after_min_received: Any,
    send_order: Any, task_assignment_timeout: Any, task_result_timeout: Any, dynamic_targets: Any,
    forever: Any,
) -> Request:
    """Check a scheduling call; raise TaskError naming the first bad argument."""
    if not isinstance(task, Task):
        raise TaskError("task", f"must be a Task, got {type(task).__name__}")
    if method not in METHODS:
        raise TaskError("method", f"must be one of {', '.join(METHODS)}, got {method!r}")
    if not isinstance(forever, bool) or (forever and method != BROADCAST):
        raise TaskError("forever", "only a broadcast can stand forever (a bool)")
    if not isinstance(dynamic_targets, bool):
        raise TaskError("dynamic_targets", f"must be a bool, got {dynamic_targets!r}")
    requested = _check_targets(targets)
    count = _check_count(min_responses, "min_responses")
    wait = check_seconds(wait_time_after_min_received, "wait_time_after_min_received")
    order = _check_order(send_order)
    assign = check_seconds(task_assignment_timeout, "task_assignment_timeout")
    result = check_seconds(task_result_timeout, "task_result_timeout")
    data = as_json(task.data, "task.data")
    props = as_json(task.props, "task.props")
    if method == RELAY:
        if order is not SendOrder.SEQUENTIAL:
            raise TaskError("send_order", "a relay visits its targets in order: only SendOrder.SEQUENTIAL is supported")
        for name, value in (("task_assignment_timeout", assign), ("task_result_timeout", result)):
            if task.timeout and value > task.timeout:
                raise TaskError(name, f"{value:g} s is longer than the task's timeout ({task.timeout:g} s)")
    # arguments a method ignores take their defaults, so equal calls record equal events
    if method != BROADCAST or forever:
        count, wait = 0, 0.0
    if method == BROADCAST:
        order, assign = SendOrder.SEQUENTIAL, 0.0
    if method != RELAY:
        result, dynamic_targets = 0.0, False
    if method == SEND and order is SendOrder.ANY:
        assign = 0.0
    return Request(
        method=method, forever=forever, name=task.name, requested_targets=requested, min_responses=count,
        wait_time_after_min_received=wait, send_order=order, task_assignment_timeout=assign,
        task_result_timeout=result, dynamic_targets=dynamic_targets, timeout=task.timeout, data=data,
        props=props,
    )


def resolve_targets(request: Request, registered: Sequence[str]) -> list[str]:
    """The task's targets: the given list (broadcast and send drop repeats) or the registered sites."""
    targets = list(registered) if request.requested_targets is None else list(request.requested_targets)
    if request.method != RELAY:
        targets = list(dict.fromkeys(targets))
    if not targets:
        why = "no site is registered" if request.requested_targets is None else "the target list is empty"
        raise TaskError("targets", f"{request.label} of task {request.name!r} needs at least one target: {why}")
    return targets


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def first_difference(request: Request, rec: TaskRecord) -> str | None:
    """How a scheduling call differs from the task the log holds under its id (None: it does not)."""
    recorded_targets = None if rec.requested_targets is None else tuple(rec.requested_targets)
    pairs: list[tuple[str, Any, Any]] = [
        ("method", "broadcast_forever" if rec.forever else rec.method, request.label),
        ("name", rec.name, request.name),
        ("targets", recorded_targets, request.requested_targets),
        ("min_responses", rec.min_responses, request.min_responses),
        ("wait_time_after_min_received", rec.wait_time_after_min_received,
         request.wait_time_after_min_received),
        ("send_order", rec.send_order, request.send_order),
        ("task_assignment_timeout", rec.task_assignment_timeout, request.task_assignment_timeout),
        ("task_result_timeout", rec.task_result_timeout, request.task_result_timeout),
        ("dynamic_targets", rec.dynamic_targets, request.dynamic_targets),
        ("timeout", rec.timeout, request.timeout),
        ("data", rec.data, request.data),
        ("props", rec.props, request.props),
    ]
    for key, recorded, now in pairs:
        if recorded != now:
            return f"{key}: recorded {_short(recorded)}, now {_short(now)}"
    return None

