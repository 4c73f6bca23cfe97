"""Load statechart YAML files into validated ``Chart`` values, with precise errors.

The YAML is composed into nodes first so every finding can name the file and line
it is about. Validation collects every problem before raising (a chart author
fixes them all in one pass) and checks:

* the top level has ``name``, ``version`` (positive int), ``initial``, ``states``, ``transitions``;
* every state named by ``initial``, a ``source`` or a ``dest`` is declared;
* every state is reachable from ``initial``;
* every non-terminal state has an exit, terminal states have none;
* a trigger appears at most once per source state;
* a state with a ``timeout`` has a transition for its timeout trigger.

``source`` may be a state, a list of states, or ``"*"`` (every non-terminal state).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from engine.charts.registry import ChartRegistry
from engine.charts.model import DEFAULT_TIMEOUT_TRIGGER, Chart, ChartState, ChartTransition, StateTimeout
from engine.errors import ChartProblem, ChartValidationError

__all__ = ["chart_from_dict", "load_chart", "load_charts", "parse_chart"]

_TOP_KEYS = {"name", "version", "initial", "states", "transitions", "description"}
_STATE_KEYS = {"terminal", "timeout", "description"}
_TRANSITION_KEYS = {"trigger", "source", "dest", "guard"}
_TIMEOUT_KEYS = {"after", "from_data", "trigger"}


class _Collector:
    def __init__(self, file: str) -> None:
        self.file = file
        self.problems: list[ChartProblem] = []

    def add(self, line: int | None, message: str) -> None:
        self.problems.append(ChartProblem(self.file, line, message))


def _line(node: yaml.Node | None) -> int | None:
    return node.start_mark.line + 1 if node is not None else None


def _plain(node: yaml.Node) -> Any:
    """Convert a composed node to plain Python data (scalars resolved by YAML's rules)."""
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node, deep=True)  # type: ignore[no-untyped-call]
    finally:
        loader.dispose()  # type: ignore[no-untyped-call]


def _mapping(node: yaml.Node, col: _Collector, what: str) -> dict[str, tuple[yaml.Node, yaml.Node]] | None:
    if not isinstance(node, yaml.MappingNode):
        col.add(_line(node), f"{what} must be a mapping")
        return None
    out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
    for key_node, value_node in node.value:
        key = str(_plain(key_node))
        if key in out:
            col.add(_line(key_node), f"{what}: key {key!r} appears twice")
        out[key] = (key_node, value_node)
    return out


def parse_chart(text: str, file: str = "<string>") -> Chart:
    """Parse and validate chart YAML text; raise ``ChartValidationError`` listing every problem."""
    col = _Collector(file)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        col.add(mark.line + 1 if mark is not None else None, f"not valid YAML: {getattr(exc, 'problem', exc)}")
        raise ChartValidationError(col.problems) from None
    if root is None:
        col.add(1, "empty file: a chart needs name, version, initial, states and transitions")
        raise ChartValidationError(col.problems)
    top = _mapping(root, col, "the chart")
    if top is None:
        raise ChartValidationError(col.problems)
    for key in sorted(set(top) - _TOP_KEYS):
        col.add(_line(top[key][0]), f"unknown top-level key {key!r} (allowed: {', '.join(sorted(_TOP_KEYS))})")
    for key in ("name", "version", "initial", "states", "transitions"):
        if key not in top:
            col.add(_line(root), f"missing top-level key {key!r}")
    if col.problems:
        raise ChartValidationError(col.problems)

    name = _plain(top["name"][1])
    version = _plain(top["version"][1])
    initial = _plain(top["initial"][1])
    description = _plain(top["description"][1]) if "description" in top else ""
    if not isinstance(name, str) or not name.isidentifier():
        col.add(_line(top["name"][1]), f"name must be an identifier, got {name!r}")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        col.add(_line(top["version"][1]), f"version must be a positive integer, got {version!r}")
    states = _parse_states(top["states"][1], col)
    transitions = _parse_transitions(top["transitions"][1], states, col)
    if not isinstance(initial, str) or initial not in states:
        col.add(_line(top["initial"][1]), f"initial state {initial!r} is not declared under states")
    if col.problems:
        raise ChartValidationError(col.problems)
    chart = Chart(
        name=name,
        version=version,
        initial=initial,
        states=states,
        transitions=tuple(transitions),
        description=str(description or ""),
        file=file,
    )
    _check_graph(chart, col)
    if col.problems:
        raise ChartValidationError(col.problems)
    return chart


def _parse_states(node: yaml.Node, col: _Collector) -> dict[str, ChartState]:
    entries = _mapping(node, col, "states")
    states: dict[str, ChartState] = {}
    if entries is None:
        return states
    if not entries:
        col.add(_line(node), "states is empty")
    for name, (key_node, value_node) in entries.items():
        line = _line(key_node)
        if not name.isidentifier():
            col.add(line, f"state name {name!r} must be an identifier")
        body: dict[str, Any] = {}
        if not (isinstance(value_node, yaml.ScalarNode) and _plain(value_node) is None):
            fields = _mapping(value_node, col, f"state {name!r}")
            if fields is None:
                continue
            for key in sorted(set(fields) - _STATE_KEYS):
                col.add(_line(fields[key][0]), f"state {name!r}: unknown key {key!r} (allowed: {', '.join(sorted(_STATE_KEYS))})")
            body = {k: (_plain(v), _line(v)) for k, (_, v) in fields.items()}
        terminal, terminal_line = body.get("terminal", (False, line))
        if not isinstance(terminal, bool):
            col.add(terminal_line, f"state {name!r}: terminal must be true or false, got {terminal!r}")
            terminal = False
        timeout = None
        if "timeout" in body:
            timeout = _parse_timeout(name, *body["timeout"], col)
            if terminal and timeout is not None:
                col.add(body["timeout"][1], f"state {name!r} is terminal and cannot have a timeout")
        desc = body.get("description", ("", None))[0] or ""
        states[name] = ChartState(name=name, terminal=terminal, timeout=timeout, description=str(desc), line=line)
    return states


def _parse_timeout(state: str, value: Any, line: int | None, col: _Collector) -> StateTimeout | None:
    if isinstance(value, bool):
        col.add(line, f"state {state!r}: timeout must be seconds or a mapping, got {value!r}")
        return None
    if isinstance(value, int | float):
        if value <= 0:
            col.add(line, f"state {state!r}: timeout must be positive seconds, got {value!r}")
            return None
        return StateTimeout(seconds=float(value))
    if not isinstance(value, dict):
        col.add(line, f"state {state!r}: timeout must be seconds or a mapping with after/from_data/trigger")
        return None
    unknown = set(value) - _TIMEOUT_KEYS
    if unknown:
        col.add(line, f"state {state!r}: unknown timeout key(s) {sorted(unknown)} (allowed: after, from_data, trigger)")
    after = value.get("after")
    from_data = value.get("from_data")
    trigger = value.get("trigger", DEFAULT_TIMEOUT_TRIGGER)
    if after is not None and (isinstance(after, bool) or not isinstance(after, int | float) or after <= 0):
        col.add(line, f"state {state!r}: timeout.after must be positive seconds, got {after!r}")
        return None
    if from_data is not None and not isinstance(from_data, str):
        col.add(line, f"state {state!r}: timeout.from_data must name a data key, got {from_data!r}")
        return None
    if after is None and from_data is None:
        col.add(line, f"state {state!r}: timeout needs 'after' (seconds) or 'from_data' (a data key)")
        return None
    if not isinstance(trigger, str) or not trigger:
        col.add(line, f"state {state!r}: timeout.trigger must be a trigger name")
        return None
    return StateTimeout(seconds=float(after) if after is not None else None, from_data=from_data, trigger=trigger)


def _parse_transitions(node: yaml.Node, states: Mapping[str, ChartState], col: _Collector) -> list[ChartTransition]:
    out: list[ChartTransition] = []
    if not isinstance(node, yaml.SequenceNode):
        col.add(_line(node), "transitions must be a list")
        return out
    seen: dict[tuple[str, str], int | None] = {}
    for item in node.value:
        line = _line(item)
        fields = _mapping(item, col, "a transition")
        if fields is None:
            continue
        for key in sorted(set(fields) - _TRANSITION_KEYS):
            col.add(_line(fields[key][0]), f"transition: unknown key {key!r} (allowed: {', '.join(sorted(_TRANSITION_KEYS))})")
        missing = [k for k in ("trigger", "source", "dest") if k not in fields]
        if missing:
            col.add(line, f"transition is missing {', '.join(missing)}")
            continue
        trigger = _plain(fields["trigger"][1])
        dest = _plain(fields["dest"][1])
        source = _plain(fields["source"][1])
        guard = _plain(fields["guard"][1]) if "guard" in fields else None
        if not isinstance(trigger, str) or not trigger.isidentifier():
            col.add(line, f"trigger must be an identifier, got {trigger!r}")
            continue
        if not isinstance(dest, str) or dest not in states:
            col.add(_line(fields["dest"][1]), f"transition {trigger!r}: unknown dest state {dest!r}")
            continue
        if guard is not None and (not isinstance(guard, str) or not guard.isidentifier()):
            col.add(_line(fields["guard"][1]), f"transition {trigger!r}: guard must be an identifier, got {guard!r}")
            continue
        sources = _expand_sources(source, states, trigger, _line(fields["source"][1]), col)
        for src in sources:
            key = (src, trigger)
            if key in seen:
                col.add(line, f"trigger {trigger!r} appears twice from state {src!r} (first at line {seen[key]})")
                continue
            seen[key] = line
            out.append(ChartTransition(trigger=trigger, source=src, dest=dest, guard=guard, line=line))
    return out


def _expand_sources(
    source: Any, states: Mapping[str, ChartState], trigger: str, line: int | None, col: _Collector
) -> list[str]:
    if source == "*":
        return [s for s, spec in states.items() if not spec.terminal]
    names: Iterable[Any] = source if isinstance(source, list) else [source]
    out: list[str] = []
    for name in names:
        if not isinstance(name, str) or name not in states:
            col.add(line, f"transition {trigger!r}: unknown source state {name!r}")
            continue
        out.append(name)
    return out


def _check_graph(chart: Chart, col: _Collector) -> None:
    exits: dict[str, list[ChartTransition]] = {s: [] for s in chart.states}
    for t in chart.transitions:
        exits[t.source].append(t)
    reached = {chart.initial}
    frontier = [chart.initial]
    while frontier:
        state = frontier.pop()
        for t in exits[state]:
            if t.dest not in reached:
                reached.add(t.dest)
                frontier.append(t.dest)
    for name, spec in chart.states.items():
        if name not in reached:
            col.add(spec.line, f"state {name!r} is unreachable from initial state {chart.initial!r}")
        if spec.terminal and exits[name]:
            col.add(exits[name][0].line, f"terminal state {name!r} has an exit ({exits[name][0].trigger!r})")
        if not spec.terminal and not exits[name]:
            col.add(spec.line, f"state {name!r} is not terminal but has no exit")
        if spec.timeout is not None and (name, spec.timeout.trigger) not in chart.table:
            col.add(spec.line, f"state {name!r} has a timeout but no transition for trigger {spec.timeout.trigger!r} from it")


def chart_from_dict(data: Mapping[str, Any], file: str = "<dict>") -> Chart:
    """Build a chart from plain data (the inverse of ``Chart.to_dict``), validated."""
    return parse_chart(yaml.safe_dump(dict(data), sort_keys=False), file)


def load_chart(path: str | Path) -> Chart:
    """Load and validate one chart file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ChartValidationError([ChartProblem(str(p), None, f"cannot read: {exc.strerror}")]) from None
    return parse_chart(text, str(p))


def load_charts(directory: str | Path | None = None) -> ChartRegistry:
    """Load every ``*.yaml`` chart in ``directory`` (default: the shipped charts).

    Several files may hold versions of one kind (``task.yaml`` and ``task.v1.yaml``): the
    log keeps events written under old versions, and replay checks each under its own.
    All files are validated; the error lists the problems of every bad file.
    """
    from engine.resources import data_dir

    root = Path(directory) if directory is not None else data_dir("statecharts")
    if not root.is_dir():
        raise ChartValidationError([ChartProblem(str(root), None, "not a directory of statecharts")])
    registry = ChartRegistry()
    problems: list[ChartProblem] = []
    for path in sorted(root.glob("*.yaml")):
        try:
            chart = load_chart(path)
        except ChartValidationError as exc:
            problems.extend(exc.problems)
            continue
        other = registry.find(chart.name, chart.version)
        if other is not None:
            problems.append(ChartProblem(str(path), None, f"chart {chart.name!r} version {chart.version} is also defined in {other.file}"))
            continue
        registry.add(chart)
    if problems:
        raise ChartValidationError(problems)
    return registry
