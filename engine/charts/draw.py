"""Mermaid state diagrams of charts, rendered through ``transitions``' diagram support.

``transitions`` 0.9.3 ships a Mermaid backend (``GraphMachine(graph_engine="mermaid")``)
that needs neither graphviz nor pygraphviz. Its flat-machine graph does not show final
states, so a small subclass adds a ``state --> [*]`` edge and a ``terminal`` style for
every terminal state; a transition fired by a state's timer is labelled with when the
timer fires (``timeout (timer: data.timeout or 300s)``) and a guarded one with its guard
in brackets.
"""

from __future__ import annotations

import copy
from typing import Any, cast

from transitions.extensions.diagrams import GraphMachine
from transitions.extensions.diagrams_mermaid import Graph

from engine.charts.build import machine_config
from engine.charts.model import Chart, StateTimeout
from engine.errors import ChartError

__all__ = ["mermaid", "timeout_label"]

# Words Mermaid's state-diagram grammar reads as statements at the start of a line: a
# state with one of these names would not parse, so drawing refuses it by name.
_MERMAID_WORDS = frozenset({"state", "note", "class", "classdef", "style", "direction", "click", "scale"})


# A copy: GraphMachine.style_attributes is a class-level dict shared by every machine.
_STYLES: dict[str, Any] = copy.deepcopy(GraphMachine.style_attributes)
_STYLES["node"]["terminal"] = {"fillcolor": "lightgrey", "color": "black", "peripheries": "2"}


class _ChartGraphMachine(GraphMachine):
    style_attributes = _STYLES


class _ChartGraph(Graph):
    """The Mermaid graph of a flat machine, with terminal states drawn as ending."""

    def _add_nodes(self, states: list[dict[str, str]], container: list[str]) -> None:
        super()._add_nodes(states, container)
        for state in states:
            if state.get("final"):
                container.append(f"{state['name']} --> [*]")


def timeout_label(timeout: StateTimeout) -> str:
    """When a state's timer fires, as text: ``data.timeout``, ``300s`` or ``data.x or 300s``."""
    parts = []
    if timeout.from_data is not None:
        parts.append(f"data.{timeout.from_data}")
    if timeout.seconds is not None:
        parts.append(f"{timeout.seconds:g}s")
    return " or ".join(parts)


def mermaid(chart: Chart) -> str:
    """Mermaid ``stateDiagram-v2`` text for ``chart``, ending with a newline."""
    clashes = sorted(s for s in chart.states if s.lower() in _MERMAID_WORDS)
    if clashes:
        raise ChartError(f"{chart.file}: cannot draw {chart.name}: state name(s) {clashes} are Mermaid keywords")
    config: dict[str, Any] = machine_config(chart)
    for spec in config["transitions"]:
        timer = chart.states[spec["source"]].timeout
        if timer is not None and timer.trigger == spec["trigger"]:
            spec["label"] = f"{spec['trigger']} (timer: {timeout_label(timer)})"
    machine = _ChartGraphMachine(**config, graph_engine="mermaid", show_conditions=True,
                                 title=f"{chart.name} v{chart.version}")
    # transitions' stub types the argument as the class; at run time it is the machine.
    graph = _ChartGraph(cast(Any, machine))
    for name, state in chart.states.items():
        if state.terminal:
            graph.set_node_style(name, "terminal")
    # The title goes into Mermaid's YAML front matter, which expects a "title:" key.
    text = graph.get_graph(title=f"title: {chart.name} v{chart.version}").source
    return text if text.endswith("\n") else text + "\n"
