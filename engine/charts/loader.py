"""Load statechart YAML files into validated ``Chart`` values, with precise errors.

The YAML is composed into nodes first so every finding can name the file and line
it is about. Validation collects every problem before raising (a chart author
fixes them all in one pass), sorted by line, and checks:

* the top level has ``name``, ``version`` (positive int), ``initial``, ``states``,
  ``transitions`` and nothing else but ``description``; states and transitions have
  only their known keys;
* every state named by ``initial``, a ``source`` or a ``dest`` is declared;
* every state is reachable from ``initial``;
* every non-terminal state has an exit, terminal states have none;
* a trigger appears at most once per source state, and ``create`` (every machine's
  first event) is not used as a trigger;
* a timeout is positive seconds or ``{after, from_data, trigger}``, and a state with a
  ``timeout`` has a transition for its timeout trigger.

Graph findings (reachability, exits, timeout triggers) are reported even when other
parts of the file are broken; a transition dropped for another problem still counts
as an exit of its sources and a way into its destination, so a typo in one line does
not also produce false "unreachable" or "no exit" findings elsewhere.

``source`` may be a state, a list of states, or ``"*"`` (every non-terminal state).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from engine.charts.model import (
    DEFAULT_TIMEOUT_TRIGGER,
    Chart,
    ChartState,
    ChartTransition,
    StateTimeout,
)
from engine.charts.registry import ChartRegistry
from engine.errors import ChartProblem, ChartValidationError

__all__ = ["RESERVED_TRIGGERS", "chart_from_dict", "load_chart", "load_charts", "parse_chart"]

_TOP_KEYS = {"name", "version", "initial", "states", "transitions", "description"}
_REQUIRED_TOP_KEYS = ("name", "version", "initial", "states", "transitions")
_STATE_KEYS = {"terminal", "timeout", "description"}
_TRANSITION_KEYS = {"trigger", "source", "dest", "guard"}
_TIMEOUT_KEYS = {"after", "from_data", "trigger"}

#: Triggers a chart may not declare. ``create`` is the trigger of every machine's first
#: event (``engine.machines.state.CREATE_TRIGGER``; a test keeps the two equal): it has
#: no source state, so a chart transition with that name would be ambiguous in replay.
RESERVED_TRIGGERS = frozenset({"create"})

_Fields = dict[str, tuple[yaml.Node, yaml.Node]]


class _Collector:
    def __init__(self, file: str) -> None:
        self.file = file
        self.problems: list[ChartProblem] = []

    def add(self, line: int | None, message: str) -> None:
        self.problems.append(ChartProblem(self.file, line, message))

    def fail(self) -> ChartValidationError:
        ordered = sorted(self.problems, key=lambda p: p.line if p.line is not None else 0)
        return ChartValidationError(ordered)


@dataclass
class _Loose:
    """What transitions dropped for some other problem still say about the graph."""

    exits: set[str] = field(default_factory=set)
    entries: set[str] = field(default_factory=set)
    triggers: set[tuple[str, str]] = field(default_factory=set)
    #: states whose own declaration is broken: their terminal flag is unknown
    unsure: set[str] = field(default_factory=set)


def _line(node: yaml.Node | None) -> int | None:
    return node.start_mark.line + 1 if node is not None else None


def _plain(node: yaml.Node) -> Any:
    """Convert a composed node to plain Python data (scalars resolved by YAML's rules)."""
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node, deep=True)
    finally:
        loader.dispose()


def _mapping(node: yaml.Node, col: _Collector, what: str) -> _Fields | None:
    if not isinstance(node, yaml.MappingNode):
        col.add(_line(node), f"{what} must be a mapping")
        return None
    out: _Fields = {}
    for key_node, value_node in node.value:
        key = str(_plain(key_node))
        if key in out:
            col.add(_line(key_node), f"{what}: key {key!r} appears twice")
        out[key] = (key_node, value_node)
    return out


def _unknown_keys(fields: _Fields, allowed: set[str], what: str, col: _Collector) -> None:
    for key in sorted(set(fields) - allowed):
        col.add(_line(fields[key][0]), f"{what}unknown key {key!r} (allowed: {', '.join(sorted(allowed))})")


def parse_chart(text: str, file: str = "<string>") -> Chart:
    """Parse and validate chart YAML text; raise ``ChartValidationError`` listing every problem."""
    col = _Collector(file)
    try:
        try:
            chart = _parse(text, col, _LOADER)
        except yaml.YAMLError:
            col = _Collector(file)  # the pure-Python parser words its errors more precisely: let it say
            chart = _parse(text, col, yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        col.add(mark.line + 1 if mark is not None else None, f"not valid YAML: {exc.problem or exc}")
        raise col.fail() from None
    except yaml.YAMLError as exc:
        col.add(None, f"not valid YAML: {exc}")
        raise col.fail() from None
    if chart is None or col.problems:
        raise col.fail()
    return chart


#: libyaml's parser where PyYAML was built with it (10x faster: every site agent parses the
#: shipped charts at start); the pure-Python one otherwise. Both give nodes with line marks.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _parse(text: str, col: _Collector, loader: Any) -> Chart | None:
    root = yaml.compose(text, Loader=loader)
    if root is None:
        col.add(1, "empty file: a chart needs name, version, initial, states and transitions")
        return None
    top = _mapping(root, col, "the chart")
    if top is None:
        return None
    for key in sorted(set(top) - _TOP_KEYS):
        col.add(_line(top[key][0]), f"unknown top-level key {key!r} (allowed: {', '.join(sorted(_TOP_KEYS))})")
    for key in _REQUIRED_TOP_KEYS:
        if key not in top:
            col.add(_line(root), f"missing top-level key {key!r}")

    name = _plain(top["name"][1]) if "name" in top else None
    if "name" in top and (not isinstance(name, str) or not name.isidentifier()):
        col.add(_line(top["name"][1]), f"name must be an identifier, got {name!r}")
    version = _plain(top["version"][1]) if "version" in top else None
    if "version" in top and (not isinstance(version, int) or isinstance(version, bool) or version < 1):
        col.add(_line(top["version"][1]), f"version must be a positive integer, got {version!r}")
    description = _plain(top["description"][1]) if "description" in top else ""
    if description is not None and not isinstance(description, str):
        col.add(_line(top["description"][1]), "description must be text")

    loose = _Loose()
    states = _parse_states(top["states"][1], col, loose) if "states" in top else None
    transitions: list[ChartTransition] | None = None
    if "transitions" in top:
        transitions = _parse_transitions(top["transitions"][1], states, col, loose)
    raw_initial = _plain(top["initial"][1]) if "initial" in top else None
    initial = raw_initial if states is not None and isinstance(raw_initial, str) and raw_initial in states else None
    if "initial" in top and states is not None and initial is None:
        col.add(_line(top["initial"][1]), f"initial state {raw_initial!r} is not declared under states")
    if states is None or transitions is None:
        return None
    _check_graph(states, transitions, initial, loose, col)
    if col.problems or initial is None or not isinstance(name, str) or not isinstance(version, int):
        return None
    return Chart(
        name=name,
        version=version,
        initial=initial,
        states=states,
        transitions=tuple(transitions),
        description=description or "",
        file=col.file,
    )


def _parse_states(node: yaml.Node, col: _Collector, loose: _Loose) -> dict[str, ChartState] | None:
    entries = _mapping(node, col, "states")
    if entries is None:
        return None
    if not entries:
        col.add(_line(node), "states is empty")
    states: dict[str, ChartState] = {}
    for name, (key_node, value_node) in entries.items():
        line = _line(key_node)
        if not name.isidentifier():
            col.add(line, f"state name {name!r} must be an identifier")
        body: dict[str, tuple[Any, int | None]] = {}
        if not (isinstance(value_node, yaml.ScalarNode) and _plain(value_node) is None):
            fields = _mapping(value_node, col, f"state {name!r}")
            if fields is None:
                # Keep the state so transitions naming it resolve; its flags are unknown.
                loose.unsure.add(name)
                states[name] = ChartState(name=name, line=line)
                continue
            _unknown_keys(fields, _STATE_KEYS, f"state {name!r}: ", col)
            body = {k: (_plain(v), _line(v)) for k, (_, v) in fields.items()}
        terminal, terminal_line = body.get("terminal", (False, line))
        if not isinstance(terminal, bool):
            col.add(terminal_line, f"state {name!r}: terminal must be true or false, got {terminal!r}")
            loose.unsure.add(name)
            terminal = False
        timeout = None
        if "timeout" in body:
            value, timeout_line = body["timeout"]
            timeout = _parse_timeout(name, value, timeout_line, col)
            if terminal and value is not None:
                col.add(timeout_line, f"state {name!r} is terminal and cannot have a timeout")
                timeout = None
        desc, desc_line = body.get("description", ("", None))
        if desc is not None and not isinstance(desc, str):
            col.add(desc_line, f"state {name!r}: description must be text")
            desc = str(desc)
        states[name] = ChartState(name=name, terminal=terminal, timeout=timeout, description=desc or "", line=line)
    return states


def _parse_timeout(state: str, value: Any, line: int | None, col: _Collector) -> StateTimeout | None:
    what = f"state {state!r}: timeout"
    if isinstance(value, bool) or value is None:
        col.add(line, f"{what} must be seconds or a mapping, got {value!r}")
        return None
    if isinstance(value, int | float):
        if value <= 0:
            col.add(line, f"{what} must be positive seconds, got {value!r}")
            return None
        return StateTimeout(seconds=float(value))
    if not isinstance(value, dict):
        col.add(line, f"{what} must be seconds or a mapping with after/from_data/trigger, got {value!r}")
        return None
    unknown = sorted(str(k) for k in set(value) - _TIMEOUT_KEYS)
    if unknown:
        col.add(line, f"{what}: unknown key(s) {unknown} (allowed: after, from_data, trigger)")
    after = value.get("after")
    from_data = value.get("from_data")
    trigger = value.get("trigger", DEFAULT_TIMEOUT_TRIGGER)
    ok = True
    if after is not None and (isinstance(after, bool) or not isinstance(after, int | float) or after <= 0):
        col.add(line, f"{what}.after must be positive seconds, got {after!r}")
        ok = False
    if from_data is not None and (not isinstance(from_data, str) or not from_data):
        col.add(line, f"{what}.from_data must name a data key, got {from_data!r}")
        ok = False
    if after is None and from_data is None:
        col.add(line, f"{what} needs 'after' (seconds) or 'from_data' (a data key)")
        ok = False
    if not isinstance(trigger, str) or not trigger.isidentifier():
        col.add(line, f"{what}.trigger must be a trigger name, got {trigger!r}")
        ok = False
    if not ok:
        return None
    return StateTimeout(seconds=float(after) if after is not None else None, from_data=from_data, trigger=trigger)


def _parse_transitions(
    node: yaml.Node, states: Mapping[str, ChartState] | None, col: _Collector, loose: _Loose
) -> list[ChartTransition] | None:
    if not isinstance(node, yaml.SequenceNode):
        col.add(_line(node), "transitions must be a list")
        return None
    out: list[ChartTransition] = []
    seen: dict[tuple[str, str], int | None] = {}
    for item in node.value:
        line = _line(item)
        fields = _mapping(item, col, "a transition")
        if fields is None:
            continue
        _unknown_keys(fields, _TRANSITION_KEYS, "transition: ", col)
        missing = [k for k in ("trigger", "source", "dest") if k not in fields]
        if missing:
            col.add(line, f"transition is missing {', '.join(missing)}")
        trigger = _plain(fields["trigger"][1]) if "trigger" in fields else None
        ok = not missing
        if "trigger" in fields:
            if not isinstance(trigger, str) or not trigger.isidentifier():
                col.add(_line(fields["trigger"][1]), f"trigger must be an identifier, got {trigger!r}")
                ok = False
            elif trigger in RESERVED_TRIGGERS:
                col.add(_line(fields["trigger"][1]),
                        f"trigger {trigger!r} is reserved for a machine's first event")
                ok = False
        label = trigger if isinstance(trigger, str) else "?"
        dest = _plain(fields["dest"][1]) if "dest" in fields else None
        dest_ok = states is not None and isinstance(dest, str) and dest in states
        if "dest" in fields and states is not None and not dest_ok:
            col.add(_line(fields["dest"][1]), f"transition {label!r}: unknown dest state {dest!r}")
            ok = False
        if "guard" in fields:
            guard = _plain(fields["guard"][1])
            if not isinstance(guard, str) or not guard.isidentifier():
                col.add(_line(fields["guard"][1]), f"transition {label!r}: guard must be an identifier, got {guard!r}")
                ok = False
        else:
            guard = None
        sources: list[str] = []
        all_sources_known = True
        if "source" in fields and states is not None:
            sources, all_sources_known = _expand_sources(
                _plain(fields["source"][1]), states, label, _line(fields["source"][1]), col
            )
        if states is None:
            continue
        if not ok or not isinstance(trigger, str) or not isinstance(dest, str):
            loose.exits.update(sources)
            if isinstance(trigger, str):
                loose.triggers.update((s, trigger) for s in sources)
            if dest_ok:
                loose.entries.add(str(dest))
            continue
        if not all_sources_known:
            # The misspelt source may be the only way into dest: do not call it unreachable.
            loose.entries.add(dest)
        for src in sources:
            key = (src, trigger)
            if key in seen:
                col.add(line, f"trigger {trigger!r} appears twice from state {src!r} (first at line {seen[key]})")
                loose.entries.add(dest)
                continue
            seen[key] = line
            out.append(ChartTransition(trigger=trigger, source=src, dest=dest, guard=guard, line=line))
    return out


def _expand_sources(
    source: Any, states: Mapping[str, ChartState], trigger: str, line: int | None, col: _Collector
) -> tuple[list[str], bool]:
    """The source states a transition names, and whether every name was known."""
    if source == "*":
        return [s for s, spec in states.items() if not spec.terminal], True
    names: Iterable[Any] = source if isinstance(source, list) else [source]
    out: list[str] = []
    known = True
    for name in names:
        if not isinstance(name, str) or name not in states:
            col.add(line, f"transition {trigger!r}: unknown source state {name!r}")
            known = False
            continue
        out.append(name)
    if not out and known:
        col.add(line, f"transition {trigger!r}: source names no state")
        known = False
    return out, known


def _check_graph(
    states: Mapping[str, ChartState],
    transitions: list[ChartTransition],
    initial: str | None,
    loose: _Loose,
    col: _Collector,
) -> None:
    exits: dict[str, list[ChartTransition]] = {s: [] for s in states}
    table: set[tuple[str, str]] = set()
    for t in transitions:
        exits[t.source].append(t)
        table.add((t.source, t.trigger))
    if initial is not None:
        # Destinations of broken transitions count as reached: their source may be fine
        # once the typo is fixed, and a false "unreachable" would only add noise.
        reached = {initial} | loose.entries
        frontier = list(reached)
        while frontier:
            state = frontier.pop()
            for t in exits.get(state, ()):
                if t.dest not in reached:
                    reached.add(t.dest)
                    frontier.append(t.dest)
        for name, spec in states.items():
            if name not in reached:
                col.add(spec.line, f"state {name!r} is unreachable from initial state {initial!r}")
    for name, spec in states.items():
        if name in loose.unsure:
            continue
        if spec.terminal and exits[name]:
            col.add(exits[name][0].line, f"terminal state {name!r} has an exit ({exits[name][0].trigger!r})")
        if not spec.terminal and not exits[name] and name not in loose.exits:
            col.add(spec.line, f"state {name!r} is not terminal but has no exit")
        if spec.timeout is not None:
            key = (name, spec.timeout.trigger)
            if key not in table and key not in loose.triggers:
                col.add(spec.line, f"state {name!r} has a timeout but no transition for trigger "
                                   f"{spec.timeout.trigger!r} from it")


def chart_from_dict(data: Mapping[str, Any], file: str = "<dict>") -> Chart:
    """Build a chart from plain data (the inverse of ``Chart.to_dict``), validated."""
    try:
        text = yaml.safe_dump(dict(data), sort_keys=False)
    except yaml.YAMLError as exc:
        raise ChartValidationError([ChartProblem(file, None, f"not plain data: {exc}")]) from None
    return parse_chart(text, file)


def load_chart(path: str | Path) -> Chart:
    """Load and validate one chart file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else f"not UTF-8 text ({exc.reason})"
        raise ChartValidationError([ChartProblem(str(p), None, f"cannot read: {reason}")]) from None
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
            problems.append(ChartProblem(
                str(path), None, f"chart {chart.name!r} version {chart.version} is also defined in {other.file}"
            ))
            continue
        registry.add(chart)
    if problems:
        raise ChartValidationError(problems)
    return registry
