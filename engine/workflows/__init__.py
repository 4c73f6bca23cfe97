"""Deterministic controllers: workflows as plain Python, replayed from the log after a crash.

A workflow is a function of a ``Controller`` (``def fedavg(ctl, rounds=3): ...``) run
by a ``WorkflowRunner`` in its own thread against a ``TaskManager``. See
``engine.workflows.controller`` for the replay and checkpoint rules and
``engine.workflows.builtin`` for FedAvg / scatter-and-gather and cyclic relay.
"""

from __future__ import annotations

from engine.workflows.builtin import cyclic, fedavg, scatter_and_gather, weighted_mean
from engine.workflows.controller import Controller, TaskHandle, task_id_for, workflow_machine_id
from engine.workflows.runner import Workflow, WorkflowRunner

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
