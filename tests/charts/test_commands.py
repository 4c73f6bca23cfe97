"""``fedlog charts check|draw``: the command functions, and once through the real CLI."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from engine.charts.draw import mermaid
from engine.charts.registry import ChartRegistry
from engine.cli import main
from engine.commands.charts import cmd_check, cmd_draw
from engine.errors import ChartError, ConfigError

GOOD = """\
name: demo
version: 1
initial: a
states:
  a: {}
  b: {terminal: true}
transitions:
  - {trigger: go, source: a, dest: b}
"""

# Two problems on known lines: an unreachable state (line 6) and an exit from a terminal one (line 10).
BAD = """\
name: broken
version: 1
initial: a
states:
  a: {}
  lost: {}
  b: {terminal: true}
transitions:
  - {trigger: go, source: a, dest: b}
  - {trigger: back, source: b, dest: a}
  - {trigger: out, source: lost, dest: b}
"""


def check(directory: Path | None) -> argparse.Namespace:
    return argparse.Namespace(dir=None if directory is None else str(directory))


def test_check_shipped_charts(capsys: pytest.CaptureFixture[str], charts: ChartRegistry) -> None:
    assert cmd_check(check(None)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(charts.kinds())
    for line, chart in zip(lines, charts, strict=True):
        terminal = sum(s.terminal for s in chart.states.values())
        assert re.fullmatch(
            rf"{chart.name} v1: {len(chart.states)} states \({terminal} terminal, \d+ with a timeout\), "
            rf"{len(chart.transitions)} transitions  \[{chart.name}\.yaml\]", line), line


def test_check_reports_every_problem_with_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "demo.yaml").write_text(GOOD, encoding="utf-8")
    (tmp_path / "broken.yaml").write_text(BAD, encoding="utf-8")
    assert cmd_check(check(tmp_path)) == 1
    bad = tmp_path / "broken.yaml"
    assert capsys.readouterr().out.splitlines() == [
        f"{bad}:6: state 'lost' is unreachable from initial state 'a'",
        f"{bad}:10: terminal state 'b' has an exit ('back')",
        f"2 problem(s) in {tmp_path}",
    ]


def test_check_lists_older_versions_and_refuses_an_empty_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cmd_check(check(tmp_path)) == 1
    assert capsys.readouterr().out == f"{tmp_path}: no *.yaml statecharts found\n"
    (tmp_path / "demo.yaml").write_text(GOOD.replace("version: 1", "version: 2"), encoding="utf-8")
    (tmp_path / "demo.v1.yaml").write_text(GOOD, encoding="utf-8")
    assert cmd_check(check(tmp_path)) == 0
    assert capsys.readouterr().out == (
        "demo v2 (also v1): 2 states (1 terminal, 0 with a timeout), 1 transitions  [demo.yaml]\n")


def test_draw_prints_mermaid(tmp_path: Path, capsys: pytest.CaptureFixture[str], charts: ChartRegistry) -> None:
    assert cmd_draw(argparse.Namespace(kind="task", dir=None, version=None)) == 0
    assert capsys.readouterr().out == mermaid(charts["task"])
    (tmp_path / "demo.yaml").write_text(GOOD.replace("version: 1", "version: 2").replace("go}", "go2}")
                                        .replace("trigger: go,", "trigger: go2,"), encoding="utf-8")
    (tmp_path / "demo.v1.yaml").write_text(GOOD, encoding="utf-8")
    assert cmd_draw(argparse.Namespace(kind="demo", dir=str(tmp_path), version=1)) == 0
    out = capsys.readouterr().out
    assert "title: demo v1" in out and "a --> b: go\n" in out
    assert cmd_draw(argparse.Namespace(kind="demo", dir=str(tmp_path), version=None)) == 0
    assert "a --> b: go2\n" in capsys.readouterr().out


def test_draw_errors(tmp_path: Path) -> None:
    with pytest.raises(ChartError, match="no statechart for demo version 3; known charts: demo v\\[1\\]"):
        (tmp_path / "demo.yaml").write_text(GOOD, encoding="utf-8")
        cmd_draw(argparse.Namespace(kind="demo", dir=str(tmp_path), version=3))
    with pytest.raises(ConfigError, match="--version must be a positive integer"):
        cmd_draw(argparse.Namespace(kind="demo", dir=str(tmp_path), version=0))


def test_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str], charts: ChartRegistry) -> None:
    assert main(["charts", "check"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == len(charts.kinds())
    (tmp_path / "broken.yaml").write_text(BAD, encoding="utf-8")
    assert main(["charts", "check", "--dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"{tmp_path / 'broken.yaml'}:6: state 'lost' is unreachable" in out
    assert main(["charts", "draw", "site"]) == 0
    assert capsys.readouterr().out == mermaid(charts["site"])
    assert main(["charts", "draw", "nosuch"]) == 2
    assert "fedlog charts: error: no statechart for nosuch" in capsys.readouterr().err
