"""Shared pieces of the workflow tests: in-process sites that serve a running workflow.

Sites run on the test's event loop and answer through the task manager's site API
(``process_task_request``/``process_submission``), as ``tests/tasks`` does. The driver
waits for the workflow to block on a task (``WorkflowRunner.next_wait``), serves every
site until none gets work, and repeats until the workflow ends; nothing sleeps and
time moves only by hand.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from engine.log.recorder import EventRecorder
from engine.tasks import TaskManager
from engine.workflows import WorkflowRunner, workflow_machine_id

#: each site's example count and the offset its "training" adds to every weight
N = {"a": 1, "b": 1, "c": 2}
OFFSET = {"a": 1.0, "b": 2.0, "c": 4.0}
SITES = ("a", "b", "c")
#: a deadline for the workflow to make progress (a hang fails the test instead of blocking it)
DEADLINE_S = 30


def train(site: str, data: Any) -> Any:
    """A site's training: add its offset to every weight; report its example count (else echo)."""
    if not isinstance(data, dict) or "model" not in data:
        return {"site": site, "echo": data}
    model = data["model"]
    out = {k: [x + OFFSET[site] for x in v] if isinstance(v, list) else v + OFFSET[site] for k, v in model.items()}
    return {"model": out, "n": N[site]}


async def serve(runner: WorkflowRunner, manager: TaskManager, sites: Sequence[str], *,
                answer: Callable[[str, Any], Any] = train, stop_after: int | None = None,
                seen: list[tuple[str, Any]] | None = None) -> int:
    """Serve the workflow's tasks until it ends; return how many results were submitted.

    ``stop_after``: once that many results were submitted, return at the next
    assignment a site takes (left unanswered, as if the server died while it ran).
    """
    waits, submitted = 0, 0
    while True:
        got = await asyncio.wait_for(runner.next_wait(waits), DEADLINE_S)
        if got is None:
            return submitted
        waits = got
        progress = True
        while progress:
            progress = False
            for site in sites:
                assignment = await manager.process_task_request(site)
                if assignment is None:
                    continue
                if stop_after is not None and submitted >= stop_after:
                    return submitted
                if seen is not None:
                    seen.append((site, assignment.data))
                await manager.process_submission(site, assignment.task_id, assignment.client_task_id,
                                                 answer(site, assignment.data))
                submitted += 1
                progress = True


def records(recorder: EventRecorder, job_id: str) -> list[dict[str, Any]]:
    """The data of the job's workflow ``record`` events, in order."""
    return [e.data or {} for e in recorder.read(machine_id=workflow_machine_id(job_id)) if e.trigger == "record"]


def results_per_share(recorder: EventRecorder, job_id: str) -> dict[str, int]:
    """How many ``result`` events each share of the job's tasks holds."""
    return {row.machine_id: sum(1 for e in recorder.read(machine_id=row.machine_id) if e.trigger == "result")
            for row in recorder.machines(kind="client_task") if row.machine_id.startswith(f"{job_id}.t")}
