"""The chart validator: every rule, located by exact file and line."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from engine.charts.loader import (
    RESERVED_TRIGGERS,
    chart_from_dict,
    load_chart,
    load_charts,
    parse_chart,
)
from engine.charts.model import Chart, StateTimeout
from engine.charts.registry import ChartRegistry
from engine.errors import ChartProblem, ChartValidationError
from engine.machines.state import CREATE_TRIGGER

FILE = "demo.yaml"

# A valid chart; the tests below edit copies of it. Line numbers matter: they are
# asserted exactly, so each test spells out the whole text it parses.
VALID = """\
name: demo
version: 1
initial: a
states:
  a:
    timeout: 5
  b:
    description: the middle
  c: {terminal: true}
transitions:
  - {trigger: go, source: a, dest: b}
  - {trigger: timeout, source: a, dest: c}
  - {trigger: finish, source: b, dest: c}
"""


def problems(text: str, file: str = FILE) -> list[ChartProblem]:
    with pytest.raises(ChartValidationError) as info:
        parse_chart(text, file)
    assert str(info.value) == "\n".join(str(p) for p in info.value.problems)
    return info.value.problems


def only(text: str) -> ChartProblem:
    found = problems(text)
    assert len(found) == 1, found
    return found[0]


def test_valid_chart_parses() -> None:
    chart = parse_chart(VALID, FILE)
    assert chart.name == "demo" and chart.version == 1 and chart.initial == "a"
    assert chart.states["a"].timeout == StateTimeout(seconds=5.0)
    assert chart.states["b"].description == "the middle"
    assert chart.states["a"].line == 5 and chart.transitions[2].line == 13
    assert chart.table[("a", "go")].dest == "b"
    assert chart.legal == {"a": ("go", "timeout"), "b": ("finish",), "c": ()}


def test_unreachable_state() -> None:
    p = only(VALID.replace("  c: {terminal: true}\n", "  c: {terminal: true}\n  d: {}\n")
             + "  - {trigger: skip, source: d, dest: c}\n")
    assert (p.file, p.line) == (FILE, 10)
    assert p.message == "state 'd' is unreachable from initial state 'a'"


def test_non_terminal_state_without_exit() -> None:
    p = only(VALID.replace("  - {trigger: finish, source: b, dest: c}\n", ""))
    assert (p.file, p.line) == (FILE, 7)
    assert p.message == "state 'b' is not terminal but has no exit"


def test_terminal_state_with_an_exit() -> None:
    p = only(VALID + "  - {trigger: again, source: c, dest: a}\n")
    assert (p.file, p.line) == (FILE, 14)
    assert p.message == "terminal state 'c' has an exit ('again')"


def test_duplicate_trigger_from_one_source() -> None:
    p = only(VALID + "  - {trigger: go, source: [b, a], dest: c}\n")
    assert (p.file, p.line) == (FILE, 14)
    assert p.message == "trigger 'go' appears twice from state 'a' (first at line 11)"


def test_unknown_source_state() -> None:
    p = only(VALID + "  - trigger: jump\n    source: [a, nowhere]\n    dest: c\n")
    assert (p.file, p.line) == (FILE, 15)
    assert p.message == "transition 'jump': unknown source state 'nowhere'"


def test_unknown_dest_state_does_not_also_report_a_missing_exit() -> None:
    p = only(VALID.replace("source: b, dest: c}", "source: b, dest: see}"))
    assert (p.file, p.line) == (FILE, 13)
    assert p.message == "transition 'finish': unknown dest state 'see'"


def test_unknown_initial_state_skips_reachability() -> None:
    p = only(VALID.replace("initial: a", "initial: z"))
    assert (p.file, p.line) == (FILE, 3)
    assert p.message == "initial state 'z' is not declared under states"


@pytest.mark.parametrize("key", ["name", "version", "initial", "states", "transitions"])
def test_missing_top_level_key(key: str) -> None:
    lines = VALID.splitlines(keepends=True)
    if key == "states":
        text = "".join(lines[:3] + lines[9:])
    elif key == "transitions":
        text = "".join(lines[:9])
    else:
        text = "".join(line for line in lines if not line.startswith(f"{key}:"))
    found = problems(text)
    assert ChartProblem(FILE, 1, f"missing top-level key {key!r}") in found
    assert len(found) == 1, found


def test_transition_missing_keys() -> None:
    p = only(VALID + "  - {trigger: stray, source: a}\n")
    assert (p.file, p.line) == (FILE, 14)
    assert p.message == "transition is missing dest"


@pytest.mark.parametrize(
    ("timeout", "message"),
    [
        ("-1", "state 'a': timeout must be positive seconds, got -1"),
        ("0", "state 'a': timeout must be positive seconds, got 0"),
        ("true", "state 'a': timeout must be seconds or a mapping, got True"),
        ("soon", "state 'a': timeout must be seconds or a mapping with after/from_data/trigger, got 'soon'"),
        ("{}", "state 'a': timeout needs 'after' (seconds) or 'from_data' (a data key)"),
        ("{after: 0}", "state 'a': timeout.after must be positive seconds, got 0"),
        ("{after: '5'}", "state 'a': timeout.after must be positive seconds, got '5'"),
        ("{from_data: 3}", "state 'a': timeout.from_data must name a data key, got 3"),
        ("{after: 5, trigger: 'not one'}", "state 'a': timeout.trigger must be a trigger name, got 'not one'"),
        ("{after: 5, every: 2}",
         "state 'a': timeout: unknown key(s) ['every'] (allowed: after, from_data, trigger)"),
    ],
)
def test_bad_timeout(timeout: str, message: str) -> None:
    p = only(VALID.replace("    timeout: 5\n", f"    timeout: {timeout}\n"))
    assert (p.file, p.line) == (FILE, 6)
    assert p.message == message


def test_timeout_without_a_transition_for_its_trigger() -> None:
    p = only(VALID.replace("    timeout: 5\n", "    timeout: {after: 5, trigger: expire}\n"))
    assert (p.file, p.line) == (FILE, 5)
    assert p.message == "state 'a' has a timeout but no transition for trigger 'expire' from it"


def test_timeout_on_a_terminal_state() -> None:
    p = only(VALID.replace("  c: {terminal: true}\n", "  c: {terminal: true, timeout: 3}\n"))
    assert (p.file, p.line) == (FILE, 9)
    assert p.message == "state 'c' is terminal and cannot have a timeout"


def test_timeout_forms_parse() -> None:
    chart = parse_chart(VALID.replace("    timeout: 5\n", "    timeout: {from_data: limit, after: 2.5}\n"))
    assert chart.states["a"].timeout == StateTimeout(seconds=2.5, from_data="limit", trigger="timeout")
    chart = parse_chart(VALID.replace("    timeout: 5\n", "    timeout: {from_data: limit}\n"))
    assert chart.states["a"].timeout == StateTimeout(seconds=None, from_data="limit")


def test_bad_yaml_names_the_line() -> None:
    p = only("name: demo\nversion: 1\n initial: a\n")
    assert (p.file, p.line) == (FILE, 3)
    assert p.message.startswith("not valid YAML: mapping values are not allowed here")


def test_bad_yaml_tag_names_the_line() -> None:
    p = only(VALID.replace("name: demo", "name: !!python/name:os.system demo"))
    assert (p.file, p.line) == (FILE, 1)
    assert p.message.startswith("not valid YAML:")


def test_empty_file_and_non_mapping() -> None:
    p = only("")
    assert (p.line, p.message) == (1, "empty file: a chart needs name, version, initial, states and transitions")
    p = only("- a\n- b\n")
    assert (p.line, p.message) == (1, "the chart must be a mapping")


def test_unknown_keys_everywhere() -> None:
    text = (VALID.replace("version: 1\n", "version: 1\ncolour: red\n")
            .replace("    description: the middle\n", "    description: the middle\n    colour: blue\n")
            .replace("source: b, dest: c}", "source: b, dest: c, when: now}"))
    found = problems(text)
    assert [(p.line, p.message) for p in found] == [
        (3, "unknown top-level key 'colour' (allowed: description, initial, name, states, transitions, version)"),
        (10, "state 'b': unknown key 'colour' (allowed: description, terminal, timeout)"),
        (15, "transition: unknown key 'when' (allowed: dest, guard, source, trigger)"),
    ]


@pytest.mark.parametrize(
    ("line", "replacement", "message"),
    [
        (1, "name: 3d", "name must be an identifier, got '3d'"),
        (2, "version: 0", "version must be a positive integer, got 0"),
        (2, "version: '1'", "version must be a positive integer, got '1'"),
        (2, "version: true", "version must be a positive integer, got True"),
    ],
)
def test_bad_name_or_version(line: int, replacement: str, message: str) -> None:
    lines = VALID.splitlines()
    lines[line - 1] = replacement
    p = only("\n".join(lines) + "\n")
    assert (p.file, p.line, p.message) == (FILE, line, message)


def test_bad_state_fields() -> None:
    text = (VALID.replace("  c: {terminal: true}\n", "  c: {terminal: 1}\n")
            .replace("  b:\n    description: the middle\n", "  b:\n    description: [1]\n"))
    found = problems(text)
    assert [(p.line, p.message) for p in found] == [
        (8, "state 'b': description must be text"),
        (9, "state 'c': terminal must be true or false, got 1"),
    ]


def test_state_body_not_a_mapping_keeps_the_state_known() -> None:
    # Only the broken body is reported: transitions naming c still resolve.
    p = only(VALID.replace("  c: {terminal: true}\n", "  c: [terminal]\n"))
    assert (p.line, p.message) == (9, "state 'c' must be a mapping")


def test_bad_names() -> None:
    text = (VALID.replace("  b:\n", "  b-2:\n").replace("dest: b}", "dest: b-2}")
            .replace("source: b,", "source: b-2,")
            .replace("trigger: finish", "trigger: fin ish")
            + "  - {trigger: hop, source: a, dest: b-2, guard: 'is ok'}\n")
    found = problems(text)
    assert [(p.line, p.message) for p in found] == [
        (7, "state name 'b-2' must be an identifier"),
        (13, "trigger must be an identifier, got 'fin ish'"),
        (14, "transition 'hop': guard must be an identifier, got 'is ok'"),
    ]


def test_reserved_trigger() -> None:
    assert CREATE_TRIGGER in RESERVED_TRIGGERS
    p = only(VALID.replace("trigger: go", "trigger: create"))
    assert (p.line, p.message) == (11, "trigger 'create' is reserved for a machine's first event")


def test_graph_problems_are_reported_with_other_problems() -> None:
    text = (VALID.replace("version: 1\n", "version: 1\nextra: x\n")
            .replace("  c: {terminal: true}\n", "  c: {terminal: true}\n  lonely:\n    description: never entered\n")
            + "  - {trigger: leave, source: lonely, dest: c}\n")
    found = problems(text)
    assert [(p.line, p.message) for p in found] == [
        (3, "unknown top-level key 'extra' (allowed: description, initial, name, states, transitions, version)"),
        (11, "state 'lonely' is unreachable from initial state 'a'"),
    ]


def test_many_problems_sorted_by_line() -> None:
    text = """\
name: demo
version: 1
initial: a
states:
  a: {}
  b: {}
  c: {terminal: true}
  d: {}
transitions:
  - {trigger: go, source: a, dest: b}
  - {trigger: go, source: a, dest: c}
  - {trigger: stop, source: c, dest: a}
  - {trigger: d, source: d, dest: nowhere}
"""
    found = problems(text)
    assert [(p.line, p.message) for p in found] == [
        (6, "state 'b' is not terminal but has no exit"),
        (8, "state 'd' is unreachable from initial state 'a'"),
        (11, "trigger 'go' appears twice from state 'a' (first at line 10)"),
        (12, "terminal state 'c' has an exit ('stop')"),
        (13, "transition 'd': unknown dest state 'nowhere'"),
    ]


def test_star_source_means_every_non_terminal_state() -> None:
    chart = parse_chart(VALID + "  - {trigger: abort, source: '*', dest: c}\n")
    assert sorted(t.source for t in chart.transitions if t.trigger == "abort") == ["a", "b"]


def test_load_chart_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "demo.yaml"
    path.write_text(VALID.replace("  - {trigger: finish, source: b, dest: c}\n", ""), encoding="utf-8")
    with pytest.raises(ChartValidationError) as info:
        load_chart(path)
    assert info.value.problems == [ChartProblem(str(path), 7, "state 'b' is not terminal but has no exit")]
    assert str(info.value) == f"{path}:7: state 'b' is not terminal but has no exit"


def test_load_chart_unreadable(tmp_path: Path) -> None:
    with pytest.raises(ChartValidationError) as info:
        load_chart(tmp_path / "absent.yaml")
    assert info.value.problems[0].file == str(tmp_path / "absent.yaml")
    assert info.value.problems[0].message.startswith("cannot read:")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(ChartValidationError) as info:
        load_chart(binary)
    assert info.value.problems[0].message.startswith("cannot read: not UTF-8 text")


def test_load_charts_reports_every_bad_file(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(VALID.replace("initial: a", "initial: z"), encoding="utf-8")
    (tmp_path / "b.yaml").write_text(VALID.replace("name: demo", "name: other")
                                     + "  - {trigger: again, source: c, dest: a}\n", encoding="utf-8")
    (tmp_path / "ok.yaml").write_text(VALID.replace("name: demo", "name: fine"), encoding="utf-8")
    with pytest.raises(ChartValidationError) as info:
        load_charts(tmp_path)
    assert [(Path(p.file).name, p.line) for p in info.value.problems] == [("a.yaml", 3), ("b.yaml", 14)]


def test_load_charts_duplicate_version_and_versions(tmp_path: Path) -> None:
    (tmp_path / "demo.yaml").write_text(VALID.replace("version: 1", "version: 2"), encoding="utf-8")
    (tmp_path / "demo.v1.yaml").write_text(VALID, encoding="utf-8")
    registry = load_charts(tmp_path)
    assert registry.get("demo").version == 2 and registry.get("demo", 1).version == 1
    (tmp_path / "demo.copy.yaml").write_text(VALID, encoding="utf-8")
    with pytest.raises(ChartValidationError) as info:
        load_charts(tmp_path)
    (problem,) = info.value.problems
    assert problem.file == str(tmp_path / "demo.v1.yaml")
    assert problem.message == f"chart 'demo' version 1 is also defined in {tmp_path / 'demo.copy.yaml'}"


def test_load_charts_needs_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ChartValidationError) as info:
        load_charts(tmp_path / "nope")
    assert info.value.problems == [ChartProblem(str(tmp_path / "nope"), None, "not a directory of statecharts")]


def _without_locations(chart: Chart) -> Chart:
    return dataclasses.replace(
        chart,
        file="",
        states={n: dataclasses.replace(s, line=None) for n, s in chart.states.items()},
        transitions=tuple(dataclasses.replace(t, line=None) for t in chart.transitions),
    )


def test_every_shipped_chart_round_trips_through_a_dict(charts: ChartRegistry) -> None:
    assert charts.kinds()
    for chart in charts:
        again = chart_from_dict(chart.to_dict())
        assert again.to_dict() == chart.to_dict()
        # Equal as charts once the source locations (file, line) are set aside.
        assert _without_locations(again) == _without_locations(chart)
        assert again.table.keys() == chart.table.keys()


def test_chart_from_dict_validates() -> None:
    data = parse_chart(VALID).to_dict()
    data["transitions"] = data["transitions"][:2]
    with pytest.raises(ChartValidationError) as info:
        chart_from_dict(data, "data")
    assert [p.message for p in info.value.problems] == ["state 'b' is not terminal but has no exit"]
    with pytest.raises(ChartValidationError) as info:
        chart_from_dict({"name": object()}, "data")
    assert info.value.problems[0].message.startswith("not plain data:")
