"""Shared pieces of the task-manager tests: a manager over a log, and log inspection.

Every test drives time by hand: the runtime runs without its timer thread, the
clock is a ManualClock, and ``Harness.tick`` moves the clock and fires whatever
fell due (runtime timers and the manager's alarms), then waits until the manager
has handled all of it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from engine.charts.registry import ChartRegistry
from engine.clock import ManualClock
from engine.log.recorder import EventRecorder
from engine.log.sql import open_recorder
from engine.machines.runtime import Runtime
from engine.tasks import TaskAssignment, TaskManager

US = 1_000_000


@dataclass
class Harness:
    """A recorder, a runtime without timer thread and a task manager, on one manual clock."""

    recorder: EventRecorder
    runtime: Runtime
    manager: TaskManager
    clock: ManualClock

    async def tick(self, seconds: float = 0.0) -> int:
        """Move the clock by ``seconds`` and run everything that fell due."""
        if seconds:
            self.clock.advance(seconds)
        return await self.manager.run_due_timers()

    async def connect(self, *sites: str) -> None:
        """Each site makes contact (becomes active)."""
        for site in sites:
            await self.manager.client_is_active(site, "test")

    async def take(self, site: str) -> TaskAssignment:
        """The site asks for work and must get some."""
        assignment = await self.manager.process_task_request(site)
        assert assignment is not None, f"{site} got no task"
        return assignment

    async def answer(self, site: str, assignment: TaskAssignment, result: Any) -> str:
        """Submit ``result`` for ``assignment`` as ``site``; return the outcome's value."""
        outcome = await self.manager.process_submission(site, assignment.task_id, assignment.client_task_id,
                                                        result)
        return outcome.value

    def state(self, machine_id: str) -> str:
        """A machine's state as the projection holds it."""
        row = self.recorder.get_machine(machine_id)
        assert row is not None, machine_id
        return row.state

    def triggers(self, machine_id: str) -> list[str]:
        """The triggers of a machine's events, in order."""
        return [e.trigger for e in self.recorder.read(machine_id=machine_id)]

    def events(self, machine_id: str, trigger: str) -> list[dict[str, Any]]:
        """The data of a machine's events with ``trigger``."""
        return [e.data or {} for e in self.recorder.read(machine_id=machine_id) if e.trigger == trigger]


@asynccontextmanager
async def harness(target: str, charts: ChartRegistry, clock: ManualClock, **kw: Any) -> AsyncIterator[Harness]:
    """Open the log at ``target`` with a task manager; close all of it afterwards."""
    recorder = open_recorder(target)
    runtime = Runtime(recorder, charts, clock=clock, run_timers=False)
    manager = TaskManager(runtime, clock=clock, job_id="job", **kw)
    try:
        yield Harness(recorder, runtime, manager, clock)
    finally:
        await manager.aclose()
        runtime.close()
        recorder.close()
