"""The demo's seeded plan: which trigger each job machine receives at which tick.

Time in the demo is logical: tick ``t`` is ``start_us + t * step_us``. Each machine
gets a short script drawn from its own random stream (seeded by the run's seed and
the machine's index, so machine ``i``'s script does not depend on how many machines
there are). Scripts follow the shipped ``job`` chart and include what a real server
sees: deployments that time out (a timer fires, a later ``start`` is then illegal
and rejected), a ``start`` planned exactly at the deploy deadline (the planned
trigger runs before that tick's timers, so it wins), failures, aborts, and a few
triggers that are illegal where they land.

A machine has at most one action per tick; that is what lets the driver tell, after
a crash, whether a machine's action of the interrupted tick was already applied.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["KIND", "Action", "Plan", "build_plan"]

#: the shipped chart the demo drives
KIND = "job"

US_PER_S = 1_000_000
#: 2030-01-01T00:00:00Z: a fixed logical epoch, so every run has the same timestamps
START_US = 1_893_456_000 * US_PER_S
STEP_US = US_PER_S
#: creations are spread over the first ticks; scripts run for up to ~40 ticks after
RAMP_TICKS = 24


@dataclass(frozen=True, slots=True)
class Action:
    """One planned call: create the machine, or fire ``trigger`` on it, at ``tick``."""

    tick: int
    machine_id: str
    trigger: str  # "create" creates the machine
    data: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Plan:
    """Every action of a run, by tick, and the logical clock that times them."""

    seed: int
    machines: int
    actions: tuple[Action, ...]
    last_tick: int
    start_us: int = START_US
    step_us: int = STEP_US
    _by_tick: dict[int, tuple[Action, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_tick: dict[int, list[Action]] = {}
        for action in self.actions:
            by_tick.setdefault(action.tick, []).append(action)
        object.__setattr__(self, "_by_tick", {t: tuple(a) for t, a in by_tick.items()})

    def time_us(self, tick: int) -> int:
        """The logical time of ``tick``."""
        return self.start_us + tick * self.step_us

    def tick_of(self, ts_us: int) -> int:
        """The tick a logical timestamp belongs to."""
        return (ts_us - self.start_us) // self.step_us

    def at(self, tick: int) -> tuple[Action, ...]:
        """The actions planned for ``tick``, machines in id order."""
        return self._by_tick.get(tick, ())

    def machine_ids(self) -> Iterator[str]:
        """Every machine the plan creates, in id order."""
        for i in range(self.machines):
            yield machine_id(i)


def machine_id(index: int) -> str:
    """The id of the demo's ``index``-th job machine."""
    return f"job-{index:04d}"


def _script(rng: random.Random, index: int) -> list[tuple[int, str, dict[str, Any] | None]]:
    """(tick offset from creation, trigger, data) for one machine; offsets strictly increase."""
    name = f"demo job {index}"
    steps: list[tuple[int, str, dict[str, Any] | None]] = [(0, "create", {"name": name})]
    t = rng.randint(1, 3)
    scenario = rng.choices(
        ["complete", "deploy_timeout", "start_at_deadline", "fail", "abort", "illegal", "never_deployed"],
        weights=[40, 15, 5, 15, 10, 10, 5],
    )[0]
    if scenario == "never_deployed":
        steps.append((t, "fail", {"error": "no site could take the job"}))
        return steps
    if scenario == "abort" and rng.random() < 0.3:
        steps.append((t, "abort", {"by": "admin"}))
        return steps
    if scenario == "deploy_timeout":
        timeout = rng.choice([1.5, 2, 3, 4.25])
        steps.append((t, "deploy", {"deploy_timeout": timeout, "sites": rng.randint(2, 8)}))
        # arrives after the deadline: the timer has failed the job, start is rejected
        steps.append((t + math.ceil(timeout) + rng.randint(1, 3), "start", None))
        return steps
    if scenario == "start_at_deadline":
        edge = rng.choice([2, 3, 5])
        steps.append((t, "deploy", {"deploy_timeout": edge, "sites": rng.randint(2, 8)}))
        t += edge  # the start lands on the deadline tick, before that tick's timers
    else:
        patience = rng.choice([6, 8.5, 12, None])
        data: dict[str, Any] = {"sites": rng.randint(2, 8)}
        if patience is not None:
            data["deploy_timeout"] = patience  # else the chart's default applies
        steps.append((t, "deploy", data))
        t += rng.randint(1, 5)
        if scenario == "illegal":
            steps.append((t, "finish", {"note": "too early: still deploying"}))
            t += 1
    steps.append((t, "start", None))
    if scenario == "abort":
        steps.append((t + rng.randint(1, 10), "abort", {"by": "admin"}))
        return steps
    t += rng.randint(2, 15)
    if scenario == "fail":
        steps.append((t, "fail", {"error": rng.choice(["site lost", "workflow raised", "out of memory"])}))
    else:
        steps.append((t, "finish", {"rounds": rng.randint(1, 10)}))
    if rng.random() < 0.1:
        steps.append((t + rng.randint(1, 3), "abort", {"by": "late admin"}))  # terminal: rejected
    return steps


def build_plan(machines: int, seed: int) -> Plan:
    """The deterministic plan of a demo run with ``machines`` jobs and ``seed``."""
    actions: list[Action] = []
    for index in range(machines):
        rng = random.Random(f"fedlog-demo:{seed}:{index}")
        created = rng.randrange(RAMP_TICKS)
        for offset, trigger, data in _script(rng, index):
            actions.append(Action(created + offset, machine_id(index), trigger, data))
    actions.sort(key=lambda a: (a.tick, a.machine_id))
    # room for the longest timeout planned after the last action (12 s), plus one tick
    last = max((a.tick for a in actions), default=0) + 13
    return Plan(seed=seed, machines=machines, actions=tuple(actions), last_tick=last)
