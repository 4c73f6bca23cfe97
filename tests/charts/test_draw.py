"""Mermaid drawings: every state and transition, terminal states ending, timers and guards labelled."""

from __future__ import annotations

import re

import pytest

from engine.charts.draw import mermaid, timeout_label
from engine.charts.loader import parse_chart
from engine.charts.model import StateTimeout
from engine.charts.registry import ChartRegistry
from engine.errors import ChartError

EDGE = re.compile(r"^\s*(\w+) --> (\w+): (.+)$")


def edges(text: str) -> dict[tuple[str, str], list[str]]:
    """(source, dest) -> the trigger names on that edge (labels without their annotations)."""
    out: dict[tuple[str, str], list[str]] = {}
    for line in text.splitlines():
        match = EDGE.match(line)
        if match:
            labels = [part.split(" ")[0] for part in match.group(3).split(" | ")]
            out[(match.group(1), match.group(2))] = labels
    return out


def test_every_state_and_transition_is_drawn(charts: ChartRegistry) -> None:
    for chart in charts:
        text = mermaid(chart)
        assert text.startswith(f"---\ntitle: {chart.name} v{chart.version}\n---\nstateDiagram-v2\n")
        assert f"[*] --> {chart.initial}" in text
        for name, state in chart.states.items():
            assert f'state "{name}" as {name}' in text
            ends = f"  {name} --> [*]" in text
            assert ends == state.terminal, (chart.name, name)
            assert f"Class {name} s_{'terminal' if state.terminal else 'default'}" in text
        drawn = edges(text)
        expected: dict[tuple[str, str], list[str]] = {}
        for t in chart.transitions:
            expected.setdefault((t.source, t.dest), []).append(t.trigger)
        assert {k: sorted(v) for k, v in drawn.items()} == {k: sorted(v) for k, v in expected.items()}


def test_timeouts_and_guards_are_labelled(charts: ChartRegistry) -> None:
    text = mermaid(charts["task"])
    assert "standing --> timed_out: timeout (timer: data.timeout)" in text
    assert "min_received --> completed: complete | wait_elapsed (timer: data.wait_time_after_min_received)" in text
    # A timeout trigger fired by hand from a state whose timer is something else is not labelled.
    assert "min_received --> timed_out: timeout\n" in text
    assert "active --> missing: timeout (timer: data.heartbeat_timeout or 60s)" in mermaid(charts["site"])
    guarded = parse_chart("""\
name: gated
version: 1
initial: closed
states:
  closed: {timeout: 2.5}
  open: {terminal: true}
transitions:
  - {trigger: unlock, source: closed, dest: open, guard: has_key}
  - {trigger: timeout, source: closed, dest: open}
""")
    text = mermaid(guarded)
    assert "closed --> open: unlock [has_key] | timeout (timer: 2.5s)" in text


def test_timeout_label() -> None:
    assert timeout_label(StateTimeout(seconds=300.0)) == "300s"
    assert timeout_label(StateTimeout(from_data="limit")) == "data.limit"
    assert timeout_label(StateTimeout(seconds=0.5, from_data="limit")) == "data.limit or 0.5s"


def test_mermaid_keywords_are_refused_by_name() -> None:
    chart = parse_chart("""\
name: odd
version: 1
initial: note
states:
  note: {}
  done: {terminal: true}
transitions:
  - {trigger: go, source: note, dest: done}
""", "odd.yaml")
    with pytest.raises(ChartError, match=r"odd.yaml: cannot draw odd: state name\(s\) \['note'\] are Mermaid keywords"):
        mermaid(chart)


def test_drawing_does_not_change_other_graph_machines() -> None:
    from transitions.extensions.diagrams import GraphMachine

    assert "terminal" not in GraphMachine.style_attributes["node"]
