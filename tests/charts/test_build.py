"""``transitions`` machines built from charts: same moves as the table, restore without callbacks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
from transitions import Machine, MachineError

from engine.charts.build import (
    ChartMachine,
    ChartModel,
    build_machine,
    build_machines,
    differences,
    fire,
    machine_config,
    restore,
)
from engine.charts.loader import parse_chart
from engine.charts.registry import ChartRegistry
from engine.errors import ChartError, GuardRejected, TransitionRejected

GUARDED = """\
name: gated
version: 3
initial: closed
states:
  closed: {}
  open: {}
  gone: {terminal: true}
transitions:
  - {trigger: unlock, source: closed, dest: open, guard: has_key}
  - {trigger: lock, source: open, dest: closed}
  - {trigger: leave, source: "*", dest: gone}
"""


def test_machine_accepts_exactly_the_chart_table(charts: ChartRegistry) -> None:
    """For every shipped chart: each (state, trigger) pair moves as ``Chart.table`` says, or is refused."""
    for chart in charts:
        machine = build_machine(chart)
        assert isinstance(machine, Machine)
        assert machine.auto_transitions is False
        assert machine.models == []  # built with model=None: models come later, many of them
        triggers = {t.trigger for t in chart.transitions}
        assert set(machine.events) == triggers  # no auto "to_<state>" triggers
        for state in chart.states:
            assert sorted(machine.get_triggers(state)) == list(chart.legal[state])
            for trigger in sorted(triggers):
                model = ChartModel(f"{state}/{trigger}")
                machine.add_model(model, initial=state)
                expected = chart.table.get((state, trigger))
                if expected is None:
                    with pytest.raises(MachineError):
                        machine.events[trigger].trigger(model)
                    assert model.state == state
                else:
                    assert machine.events[trigger].trigger(model) is True
                    assert model.state == expected.dest, (chart.name, state, trigger)
                machine.remove_model(model)


def test_differences_is_empty_for_shipped_charts_and_finds_a_tampered_machine(charts: ChartRegistry) -> None:
    for chart in charts:
        assert differences(chart) == []
    task = charts["task"]
    tampered = build_machine(task)
    tampered.add_transition("cancel", "completed", "cancelled")
    tampered.remove_transition("advance", "standing", "standing")
    found = differences(task, tampered)
    assert "task v1: 'cancel' from 'completed': machine -> cancelled, chart -> rejected" in found
    assert "task v1: 'advance' from 'standing': machine -> rejected, chart -> standing" in found


def test_one_machine_holds_many_models(charts: ChartRegistry) -> None:
    machine = build_machines(charts)["client_task"]
    models = [ChartModel(f"ct-{i}") for i in range(50)]
    for i, model in enumerate(models):
        restore(machine, model, "sent" if i % 2 else None)
    assert len(machine.models) == 50
    assert [m.state for m in models[:4]] == ["assigned", "sent", "assigned", "sent"]
    assert fire(machine, models[0], "send") == "sent"
    assert fire(machine, models[1], "resend") == "sent"
    assert fire(machine, models[1], "result") == "result_received"
    assert models[2].state == "assigned"  # the others did not move


def test_build_machines_uses_the_newest_version() -> None:
    old = parse_chart(GUARDED.replace("version: 3", "version: 2"))
    new = parse_chart(GUARDED)
    machines = build_machines(ChartRegistry([old, new]))
    assert list(machines) == ["gated"] and machines["gated"].chart is new


def test_restore_runs_no_callbacks_but_firing_does() -> None:
    chart = parse_chart(GUARDED)
    machine = build_machine(chart, {"has_key": lambda model, data: True})
    calls: list[str] = []
    for state in chart.states:
        machine.get_state(state).add_callback("enter", lambda event, s=state: calls.append(f"enter {s}"))
        machine.get_state(state).add_callback("exit", lambda event, s=state: calls.append(f"exit {s}"))
    model = ChartModel("m1")
    restore(machine, model, "open")
    assert model.state == "open" and calls == []
    restore(machine, model, "closed")  # already attached: moved, still silently
    assert model.state == "closed" and calls == [] and len(machine.models) == 1
    assert fire(machine, model, "unlock") == "open"
    assert calls == ["exit closed", "enter open"]


def test_restore_refuses_an_unknown_state() -> None:
    machine = build_machine(parse_chart(GUARDED))
    with pytest.raises(ChartError, match="chart version 3 has no such state"):
        restore(machine, ChartModel(), "ajar")
    assert machine.models == []


def test_guards_are_named_conditions_seeing_model_and_data() -> None:
    chart = parse_chart(GUARDED)
    seen: list[tuple[str, Mapping[str, Any]]] = []

    def has_key(model: Any, data: Mapping[str, Any]) -> bool:
        seen.append((model.machine_id, dict(data)))
        return bool(data.get("key"))

    machine = build_machine(chart)
    transition = machine.events["unlock"].transitions["closed"][0]
    assert [c.func.__name__ for c in transition.conditions] == ["has_key"]
    model = ChartModel("door")
    restore(machine, model)
    # Not registered yet: the guard refuses, as the runtime's does.
    with pytest.raises(GuardRejected) as info:
        fire(machine, model, "unlock", key=True)
    assert info.value.guard == "has_key" and model.state == "closed"
    machine.guards["has_key"] = has_key
    with pytest.raises(GuardRejected):
        fire(machine, model, "unlock", key=False)
    assert fire(machine, model, "unlock", key=True) == "open"
    assert seen == [("door", {"key": False}), ("door", {"key": True})]


def test_fire_rejects_illegal_and_unknown_triggers() -> None:
    machine = build_machine(parse_chart(GUARDED))
    model = ChartModel("door")
    restore(machine, model, "gone")
    with pytest.raises(TransitionRejected) as info:
        fire(machine, model, "lock")
    assert (info.value.machine_id, info.value.kind, info.value.state, info.value.trigger, info.value.legal) == (
        "door", "gated", "gone", "lock", [])
    restore(machine, model, "open")
    with pytest.raises(TransitionRejected) as info:
        fire(machine, model, "fly")
    assert info.value.legal == ["leave", "lock"]
    assert model.state == "open"


def test_machine_config_marks_terminal_states_final(charts: ChartRegistry) -> None:
    chart = charts["job"]
    config = machine_config(chart)
    assert config["model"] is None and config["auto_transitions"] is False
    assert {s["name"] for s in config["states"] if s["final"]} == {"finished", "failed", "aborted"}
    machine = ChartMachine(chart)
    assert machine.get_state("finished").final and not machine.get_state("running").final
