"""The task API (the reference's ``WFCommSpec``) on event-sourced task, client_task and site machines.

``TaskManager`` is the server side: schedule with ``broadcast``/``send``/``relay``
(and their ``_and_wait`` forms), serve sites with ``process_task_request`` and
``process_submission``, and rebuild everything from the log with ``recover``.
"""

from __future__ import annotations

from engine.tasks.manager import TaskManager, TaskRecovery
from engine.tasks.spec import (
    ClientTaskInfo,
    ClientTaskView,
    SendOrder,
    SubmissionOutcome,
    Task,
    TaskAssignment,
    TaskCompletionStatus,
    TaskError,
    TaskOutcome,
    TaskResult,
)

__all__ = [
    "ClientTaskInfo",
    "ClientTaskView",
    "SendOrder",
    "SubmissionOutcome",
    "Task",
    "TaskAssignment",
    "TaskCompletionStatus",
    "TaskError",
    "TaskManager",
    "TaskOutcome",
    "TaskRecovery",
    "TaskResult",
]
