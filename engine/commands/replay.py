"""``fedlog replay DB [--machine ID] [--until SEQ|TIME] [--verify] [--charts DIR]``.

Rebuilds machine states by folding the log's events, prints them as a table with a
summary line, and with ``--verify`` checks every event against the chart version it
was written under and the projection against the fold (exit status 1 on any problem).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, TextIO

from engine.charts.loader import load_charts
from engine.errors import UnknownMachine
from engine.history.access import open_log
from engine.history.render import STATE_COLUMNS, state_row, write_table
from engine.history.replay import Until, fold, parse_until
from engine.history.verify import verify_log
from engine.machines.state import MachineState

__all__ = ["ProgressLine", "cmd_replay", "register"]

#: events between two progress reports
PROGRESS_EVERY = 100_000


def register(sub: Any) -> None:
    """Add the ``replay`` command."""
    parser = sub.add_parser(
        "replay",
        help="rebuild machine states from the event log; --verify checks the log",
        description=(
            "Fold the log's events into machine states and print them. With --verify, "
            "check that every event is legal under the statechart version it was written "
            "with and that the machine_states projection matches the fold; every problem "
            "is listed and the exit status is 1."
        ),
    )
    parser.add_argument("db", metavar="DB", help="SQLite path or SQLAlchemy URL of an existing log")
    parser.add_argument("--machine", metavar="ID", help="replay only this machine")
    parser.add_argument(
        "--until", metavar="SEQ|TIME",
        help="stop after this sequence number (an integer) or this ISO 8601 time (inclusive)",
    )
    parser.add_argument("--verify", action="store_true", help="check every event and the projection")
    parser.add_argument(
        "--charts", metavar="DIR",
        help="directory of statechart YAML files, including every version the log was written "
             "under (default: the shipped charts)",
    )
    parser.add_argument(
        "--progress", action="store_true",
        help=f"report progress on stderr every {PROGRESS_EVERY:,} events even when it is not a terminal",
    )
    parser.set_defaults(func=cmd_replay)


class ProgressLine:
    """Reports a long fold's progress on a stream, every ``every`` events.

    On a terminal the line is rewritten in place; elsewhere each report is a line.
    """

    def __init__(self, stream: TextIO, total_seq: int, every: int = PROGRESS_EVERY) -> None:
        self.stream = stream
        self.total_seq = total_seq
        self.every = every
        self.next_report = every
        self.tty = stream.isatty()
        self.last = (0, 0)
        self.reported: tuple[int, int] | None = None

    def __call__(self, events: int, seq: int) -> None:
        self.last = (events, seq)
        if events < self.next_report:
            return
        self.next_report = (events // self.every + 1) * self.every
        self._write(events, seq)

    def _write(self, events: int, seq: int) -> None:
        text = f"replay: {events:,} events folded (seq {seq:,} of {self.total_seq:,})"
        self.stream.write(f"\r{text}" if self.tty else f"{text}\n")
        self.stream.flush()
        self.reported = (events, seq)

    def done(self) -> None:
        """Report the final count (if progress was shown at all) and end the line."""
        if self.reported is None:
            return
        if self.last != self.reported:
            self._write(*self.last)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _summary(events: int, machines: int, until: Until | None, elapsed: float) -> str:
    upto = f" up to {until}" if until is not None else ""
    rate = f"{events / elapsed:,.0f}" if elapsed > 0 else "-"
    return (
        f"folded {events:,} event{'' if events == 1 else 's'}{upto} into {machines:,} "
        f"machine{'' if machines == 1 else 's'} in {elapsed:.2f} s ({rate} events/s)"
    )


def cmd_replay(args: argparse.Namespace) -> int:
    """Run ``fedlog replay``; return 1 when verification found problems, else 0."""
    until = parse_until(args.until) if args.until is not None else None
    charts = load_charts(args.charts)
    out = sys.stdout
    with open_log(args.db) as log:
        progress = (
            ProgressLine(sys.stderr, log.last_seq(), PROGRESS_EVERY) if args.progress or sys.stderr.isatty() else None
        )
        started = time.perf_counter()
        try:
            if args.verify:
                report = verify_log(log, charts, machine_id=args.machine, until=until, progress=progress)
                states, events = report.states, report.events
            else:
                result = fold(log, charts, machine_id=args.machine, until=until, progress=progress)
                states, events = result.states, result.events
        finally:
            if progress is not None:
                progress.done()
        elapsed = time.perf_counter() - started
        if args.machine is not None and not states and log.get_machine(args.machine) is None:
            raise UnknownMachine(args.machine)
    _print_states(states, out)
    out.write(_summary(events, len(states), until, elapsed) + "\n")
    if not args.verify:
        return 0
    if report.problems:
        count = len(report.problems)
        out.write(f"verification FAILED: {count} problem{'' if count == 1 else 's'}:\n")
        for problem in report.problems:
            out.write(f"  {problem}\n")
        return 1
    machines = f"{len(states):,} machine{'' if len(states) == 1 else 's'}"
    if report.projection_compared:
        out.write(f"verified: {events:,} events, {machines}, projection matches\n")
    else:
        out.write(
            f"verified: {events:,} events, {machines} (projection not compared: it holds the "
            f"newest states, not those at {until})\n"
        )
    return 0


def _print_states(states: dict[str, MachineState], out: TextIO) -> None:
    if not states:
        out.write("no machines\n")
        return
    write_table(STATE_COLUMNS, (state_row(s) for s in states.values()), out, footer=False)
