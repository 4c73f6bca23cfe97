"""Deterministic controllers: workflows as plain Python, replayed from the log after a crash.

A workflow is a function of a ``Controller`` (``def fedavg(ctl, rounds=3): ...``) run
by a ``WorkflowRunner`` in its own thread against a ``TaskManager``. See
``engine.workflows.controller`` for the replay and checkpoint rules and
``engine.workflows.builtin`` for FedAvg / scatter-and-gather and cyclic relay.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.lazy import lazy_names

if TYPE_CHECKING:
    from engine.workflows.builtin import cyclic, fedavg, scatter_and_gather, weighted_mean
    from engine.workflows.controller import Controller, TaskHandle, task_id_for, workflow_machine_id
    from engine.workflows.runner import Workflow, WorkflowRunner

#: public name -> its module, imported on first use (PEP 562): the server's model-building
#: child (``python -m engine.workflows.isolated``) needs none of them, and importing the
#: task machinery it does not use cost it ~0.2 s of CPU on the job's critical path
_LAZY = {
    "cyclic": "engine.workflows.builtin",
    "fedavg": "engine.workflows.builtin",
    "scatter_and_gather": "engine.workflows.builtin",
    "weighted_mean": "engine.workflows.builtin",
    "Controller": "engine.workflows.controller",
    "TaskHandle": "engine.workflows.controller",
    "task_id_for": "engine.workflows.controller",
    "workflow_machine_id": "engine.workflows.controller",
    "Workflow": "engine.workflows.runner",
    "WorkflowRunner": "engine.workflows.runner",
}

__all__ = [
    "Controller",
    "TaskHandle",
    "Workflow",
    "WorkflowRunner",
    "cyclic",
    "fedavg",
    "scatter_and_gather",
    "task_id_for",
    "weighted_mean",
    "workflow_machine_id",
]


__getattr__, __dir__ = lazy_names("engine.workflows", _LAZY, globals())
