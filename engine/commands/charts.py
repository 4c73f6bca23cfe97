"""``fedlog charts check|draw``: validate the statecharts and draw one as Mermaid."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from engine.charts.build import differences
from engine.charts.draw import mermaid
from engine.charts.loader import load_charts
from engine.errors import ChartValidationError, ConfigError


def register(sub: Any) -> None:
    """Add the ``charts`` command."""
    parser = sub.add_parser("charts", help="validate and draw the statecharts")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    chk = actions.add_parser(
        "check", help="validate every chart; exit 1 listing each problem as file:line: message"
    )
    chk.add_argument("--dir", metavar="DIR", help="directory of *.yaml charts (default: the shipped ones)")
    chk.set_defaults(func=cmd_check)
    draw = actions.add_parser("draw", help="print a chart as a Mermaid state diagram")
    draw.add_argument("kind", metavar="KIND", help="machine kind, e.g. task")
    draw.add_argument("--dir", metavar="DIR", help="directory of *.yaml charts (default: the shipped ones)")
    draw.add_argument("--version", type=int, metavar="N", help="chart version (default: the newest)")
    draw.set_defaults(func=cmd_draw)


def _where(directory: str | None) -> str:
    return directory if directory is not None else "the shipped statecharts"


def cmd_check(args: argparse.Namespace) -> int:
    """Print one line per kind (newest version, counts, file); exit 1 listing every problem if any."""
    try:
        registry = load_charts(args.dir)
    except ChartValidationError as exc:
        for problem in exc.problems:
            print(problem)
        print(f"{len(exc.problems)} problem(s) in {_where(args.dir)}")
        return 1
    newest = list(registry)
    if not newest:
        print(f"{_where(args.dir)}: no *.yaml statecharts found")
        return 1
    older = {c.name: [o for v in range(1, c.version) if (o := registry.find(c.name, v)) is not None]
             for c in newest}
    # The transitions machines are what `draw` renders: they must say what the table says.
    mismatches = [line for c in newest for chart in (c, *older[c.name]) for line in differences(chart)]
    for chart in newest:
        terminal = sum(1 for s in chart.states.values() if s.terminal)
        timers = sum(1 for s in chart.states.values() if s.timeout is not None)
        also = f" (also v{', v'.join(str(o.version) for o in older[chart.name])})" if older[chart.name] else ""
        print(f"{chart.name} v{chart.version}{also}: {len(chart.states)} states ({terminal} terminal, "
              f"{timers} with a timeout), {len(chart.transitions)} transitions  [{Path(chart.file).name}]")
    for line in mismatches:
        print(f"transitions machine disagrees: {line}")
    return 1 if mismatches else 0


def cmd_draw(args: argparse.Namespace) -> int:
    """Print the Mermaid state diagram of chart ``KIND`` (newest version unless ``--version``)."""
    if args.version is not None and args.version < 1:
        raise ConfigError(f"--version must be a positive integer, got {args.version}")
    chart = load_charts(args.dir).get(args.kind, args.version)
    print(mermaid(chart), end="")
    return 0
