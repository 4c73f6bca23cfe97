"""Build ``transitions`` library machines from charts, for checking and drawing.

One ``ChartMachine`` per chart holds any number of models (it is built with
``model=None``), never one machine per model, and has no auto transitions: the chart
is the whole list of legal moves. A guard becomes a condition named after it, which
asks the machine's ``guards`` mapping (a missing guard refuses, as in the runtime).

The runtime's hot path does not go through these machines: measured here, a
``transitions`` trigger costs about 13-22 µs and ``add_model`` grows with the number
of models, so ``engine.machines`` looks transitions up in ``Chart.table`` instead.
These machines exist to cross-check that table (``differences``) and to draw charts
(``engine.charts.draw``). ``restore`` attaches a model at a stored state without
running entry or exit callbacks, as recovery does; ``fire`` wraps the dynamically
attached trigger methods behind one typed call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from transitions import EventData, Machine, MachineError

from engine.charts.model import Chart
from engine.charts.registry import ChartRegistry
from engine.errors import ChartError, GuardRejected, TransitionRejected

__all__ = [
    "ChartMachine",
    "ChartModel",
    "GuardFn",
    "build_machine",
    "build_machines",
    "differences",
    "fire",
    "machine_config",
    "restore",
]

#: A guard as the checking machines call it: (model, trigger data) -> allowed?
GuardFn = Callable[[Any, Mapping[str, Any]], bool]


class ChartModel:
    """A minimal model for checking machines: an id and the ``state`` the machine moves.

    ``transitions`` binds trigger and ``is_<state>`` helpers onto attached models, so this
    is a plain class (no ``__slots__``).
    """

    def __init__(self, machine_id: str = "model", state: str | None = None) -> None:
        self.machine_id = machine_id
        if state is not None:
            self.state = state

    def __repr__(self) -> str:
        return f"ChartModel({self.machine_id!r}, state={getattr(self, 'state', None)!r})"


class ChartMachine(Machine):
    """A ``transitions`` machine for one chart, holding many models.

    Attributes:
        chart: the chart it was built from.
        guards: guard name -> predicate; may be filled in after building.
    """

    def __init__(self, chart: Chart, guards: Mapping[str, GuardFn] | None = None) -> None:
        self.chart = chart
        self.guards: dict[str, GuardFn] = dict(guards or {})
        super().__init__(**machine_config(chart, self.guards))


def _condition(name: str, guards: Mapping[str, GuardFn]) -> Callable[[EventData], bool]:
    """A transitions condition that evaluates guard ``name`` (looked up when it runs)."""

    def condition(event: EventData) -> bool:
        guard = guards.get(name)
        return guard is not None and bool(guard(event.model, event.kwargs))

    # transitions' markup (and so its diagrams) names a callable condition by __name__.
    condition.__name__ = condition.__qualname__ = name
    return condition


def machine_config(chart: Chart, guards: Mapping[str, GuardFn] | None = None) -> dict[str, Any]:
    """Keyword arguments for a ``transitions`` Machine (or GraphMachine) of ``chart``.

    ``model=None`` (models are attached later, many per machine), no auto transitions,
    ``send_event=True`` so conditions see the model and the trigger's data, terminal
    states marked ``final``, and each guard a condition named after it.
    """
    table = guards if guards is not None else {}
    return {
        "model": None,
        "states": [{"name": s.name, "final": s.terminal} for s in chart.states.values()],
        "initial": chart.initial,
        "transitions": [
            {
                "trigger": t.trigger,
                "source": t.source,
                "dest": t.dest,
                **({"conditions": [_condition(t.guard, table)]} if t.guard else {}),
            }
            for t in chart.transitions
        ],
        "auto_transitions": False,
        "send_event": True,
        "ignore_invalid_triggers": False,
        "name": f"{chart.name}_v{chart.version}",
    }


def build_machine(chart: Chart, guards: Mapping[str, GuardFn] | None = None) -> ChartMachine:
    """One machine for ``chart`` that can hold many models."""
    return ChartMachine(chart, guards)


def build_machines(registry: ChartRegistry) -> dict[str, ChartMachine]:
    """One machine per kind (its newest chart version), keyed by kind."""
    return {chart.name: ChartMachine(chart) for chart in registry}


def restore(machine: ChartMachine, model: Any, state: str | None = None) -> None:
    """Put ``model`` in ``state`` (default: initial) without running entry or exit callbacks.

    Attaches the model if the machine does not hold it yet; otherwise moves it. This is
    how a machine rebuilt from the log is put back where it was: its state was reached
    in the past, and the side effects of reaching it already happened (or are re-driven
    from the log, not from here).
    """
    target = machine.chart.initial if state is None else state
    if target not in machine.chart.states:
        raise ChartError(
            f"cannot restore a {machine.chart.name} model to state {target!r}: "
            f"chart version {machine.chart.version} has no such state"
        )
    if any(m is model for m in machine.models):
        machine.set_state(target, model=model)
    else:
        machine.add_model(model, initial=target)


def fire(machine: ChartMachine, model: Any, trigger: str, **data: Any) -> str:
    """Fire ``trigger`` on ``model`` through the ``transitions`` machine; return the new state.

    Raises ``TransitionRejected`` when the trigger is not legal in the model's state and
    ``GuardRejected`` when its guard refuses (the model does not move in either case).
    """
    chart = machine.chart
    state = str(getattr(model, machine.model_attribute))
    machine_id = str(getattr(model, "machine_id", repr(model)))
    event = machine.events.get(trigger)
    if event is None:
        raise TransitionRejected(machine_id, chart.name, state, trigger, machine.get_triggers(state))
    try:
        moved = event.trigger(model, **data)
    except MachineError:
        raise TransitionRejected(machine_id, chart.name, state, trigger, machine.get_triggers(state)) from None
    if not moved:
        names = [c.func.__name__ for t in event.transitions.get(state, []) for c in t.conditions
                 if callable(c.func)]
        raise GuardRejected(machine_id, chart.name, state, trigger, ", ".join(names) or "?",
                            machine.get_triggers(state))
    return str(getattr(model, machine.model_attribute))


def differences(chart: Chart, machine: ChartMachine | None = None) -> list[str]:
    """Where a ``transitions`` machine disagrees with ``chart.table`` (empty: they agree).

    Every (state, trigger) pair of the chart is fired on a fresh model restored to the
    state, with every guard allowing: the machine must accept exactly the pairs in the
    table and land where the table says. ``machine`` defaults to one built from the chart.
    """
    if machine is None:
        machine = build_machine(chart)
    allow_all = {t.guard: (lambda _model, _data: True) for t in chart.transitions if t.guard}
    saved = dict(machine.guards)
    machine.guards.update(allow_all)
    problems: list[str] = []
    triggers = sorted({t.trigger for t in chart.transitions} | set(machine.events))
    try:
        for state in chart.states:
            if sorted(machine.get_triggers(state)) != list(chart.legal[state]):
                problems.append(f"{chart.name} v{chart.version}: state {state!r}: machine offers "
                                f"{sorted(machine.get_triggers(state))}, chart {list(chart.legal[state])}")
            for trigger in triggers:
                expected = chart.table.get((state, trigger))
                model = ChartModel(f"check-{state}-{trigger}")
                restore(machine, model, state)
                try:
                    got: str | None = fire(machine, model, trigger)
                except TransitionRejected:
                    got = None
                finally:
                    machine.remove_model(model)
                want = expected.dest if expected is not None else None
                if got != want:
                    problems.append(f"{chart.name} v{chart.version}: {trigger!r} from {state!r}: "
                                    f"machine -> {got or 'rejected'}, chart -> {want or 'rejected'}")
    finally:
        machine.guards.clear()
        machine.guards.update(saved)
    return problems
