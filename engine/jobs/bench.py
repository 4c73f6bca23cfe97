"""The benchmark job: empty broadcast_and_wait rounds, each timed by the controller's clock.

``empty_rounds`` broadcasts an empty task per round to every site and waits for all
of them; it returns each round's latency in microseconds (from ``ctl.now()``, so a
replay after a restart returns the same figures). ``noop`` is the sites' executor.
"""

from __future__ import annotations

from typing import Any

from engine.client.executor import SiteTask
from engine.tasks import Task, TaskCompletionStatus
from engine.workflows.controller import Controller

__all__ = ["empty_rounds", "noop"]


def empty_rounds(ctl: Controller, rounds: int = 10, min_clients: int = 0) -> dict[str, Any]:
    """``rounds`` empty rounds; returns ``{"latency_us": [...]}``."""
    latencies = []
    for r in range(rounds):
        start = ctl.now()
        outcome = ctl.broadcast_and_wait(Task("noop", data={"round": r}), min_responses=min_clients)
        if outcome.status is not TaskCompletionStatus.OK:
            raise RuntimeError(f"round {r} ended {outcome.status.value}: {outcome.reason}")
        latencies.append(ctl.now() - start)
        ctl.publish({"latency_us": latencies[-1]}, round=r)
    return {"latency_us": latencies}


def noop(task: SiteTask) -> dict[str, Any]:
    """An empty result."""
    return {}
