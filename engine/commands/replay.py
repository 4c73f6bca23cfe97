"""``fedlog replay``: machine states from the log, and a job's history for debugging its rounds.

- ``fedlog replay DB [--machine ID] [--until SEQ|TIME] [--verify] [--charts DIR]``: fold the
  log's events into machine states and print them; ``--verify`` checks every event
  against the chart version it was written under and the projection against the fold
  (exit status 1 on any problem).
- ``fedlog replay DB --job J [--round R]``: the job's timeline, lane per site and per
  server machine kind, gaps and timeouts marked (``engine.history.timeline``);
  ``--at SEQ|TIME`` the state of every machine of the job at that point;
  ``--export trace.json`` (Chrome trace events) or ``--export report.html``;
  ``--round R --aggregate`` re-runs the round's aggregation from the stored chunks and
  compares the model hash with the recorded one (exit 1 on a mismatch); ``--workflow``
  replays the job's workflow offline against the log (``engine.history.workflow_replay``).
- ``fedlog replay diff DB1 DB2 --job J``: the first point where two runs diverge.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from engine.charts.loader import load_charts
from engine.clock import format_us
from engine.errors import ConfigError, UnknownMachine
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
    parser.add_argument("db", metavar="DB", help="SQLite path or SQLAlchemy URL of an existing log "
                                                 "('diff' to compare two logs: fedlog replay diff DB1 DB2 --job J)")
    parser.add_argument("more", metavar="DB2", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--machine", metavar="ID", help="replay only this machine")
    parser.add_argument("--job", metavar="J", help="show this job's timeline (or, with --at, its machines)")
    parser.add_argument("--round", metavar="R", type=int, help="with --job: only this round")
    parser.add_argument("--at", metavar="SEQ|TIME", help="with --job: every machine's state at this point")
    parser.add_argument("--export", metavar="FILE",
                        help="with --job: write a Chrome trace (FILE.json) or a self-contained HTML report (FILE.html)")
    parser.add_argument("--aggregate", action="store_true",
                        help="with --job and --round: re-run the round's aggregation from the stored chunks and "
                             "check the model hash against the recorded one")
    parser.add_argument("--workflow", action="store_true",
                        help="with --job: replay the job's workflow offline against the log (a copy of it) and "
                             "report the first call that differs (NondeterminismError, exit 1)")
    parser.add_argument("--chunks", metavar="DIR", help="the server's chunk store (default: DB.chunks)")
    parser.add_argument("--gap", metavar="SECONDS", type=float, default=1.0,
                        help="mark an event that comes this long after the previous one on its lane (default 1)")
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
    if args.db == "diff":
        return _diff(args)
    if args.more:
        raise ConfigError(f"unexpected argument(s) {' '.join(args.more)!r} (two logs are compared with "
                          "'fedlog replay diff DB1 DB2 --job J')")
    if args.job is not None:
        return _job(args)
    for flag in ("round", "at", "export"):
        if getattr(args, flag) is not None:
            raise ConfigError(f"--{flag} needs --job J")
    if args.aggregate:
        raise ConfigError("--aggregate needs --job J --round R")
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


def _diff(args: argparse.Namespace) -> int:
    from engine.history.diff import first_divergence

    if len(args.more) != 2 or args.job is None:
        raise ConfigError("usage: fedlog replay diff DB1 DB2 --job J")
    with open_log(args.more[0]) as left, open_log(args.more[1]) as right:
        found = first_divergence(left, right, args.job)
    if found is None:
        print(f"job {args.job}: the two runs agree, machine by machine (times aside)")
        return 0
    print(found.describe())
    return 1


def _job(args: argparse.Namespace) -> int:
    from engine.history import timeline as tl

    if args.workflow:
        from engine.errors import NondeterminismError
        from engine.history.workflow_replay import replay_workflow

        try:
            print(replay_workflow(args.db, args.job).describe())
        except NondeterminismError as exc:
            print(f"NondeterminismError: {exc}")
            return 1
        return 0

    with open_log(args.db) as log:
        progress = ProgressLine(sys.stderr, log.last_seq(), PROGRESS_EVERY) if sys.stderr.isatty() else None
        try:
            timeline = tl.load_timeline(log, args.job, progress=progress)
        finally:
            if progress is not None:
                progress.done()
        if not timeline.events:
            raise ConfigError(f"no events of job {args.job!r} in {args.db}")
        if args.aggregate:
            return _aggregate(args, log)
    out = sys.stdout
    if args.export is not None:
        path = Path(args.export)
        if path.suffix not in (".json", ".html"):
            raise ConfigError(f"--export {path}: the file must end in .json (Chrome trace) or .html (report)")
        with open(path, "w", encoding="utf-8") as fh:
            if path.suffix == ".json":
                count = tl.write_trace(timeline, fh)
                what = f"{count:,} trace events (open in Perfetto or chrome://tracing)"
            else:
                tl.write_html(timeline, fh)
                what = "an HTML report"
        print(f"wrote {path}: {what}", file=sys.stderr)
        return 0
    if args.at is not None:
        until = parse_until(args.at)
        states = tl.state_at(timeline, until_seq=until.seq, until_us=until.ts_us)
        rows = [(e.machine_id, e.kind, e.dest, e.trigger, e.seq, format_us(e.ts_us), e.round, e.site or "")
                for e in sorted(states.values(), key=lambda e: e.machine_id)]
        write_table(("machine", "kind", "state", "by", "seq", "since", "round", "site"), rows, out)
        return 0
    tl.write_terminal(timeline, out, round_=args.round, gap_s=args.gap, color=out.isatty())
    return 0


def _aggregate(args: argparse.Namespace, log: Any) -> int:
    from engine.chunks import LocalChunkStore
    from engine.history.reaggregate import reaggregate
    from engine.log.target import is_sqlite, sqlite_path, to_url

    if args.round is None:
        raise ConfigError("--aggregate needs --round R")
    directory = args.chunks
    if directory is None:
        url = to_url(args.db)
        path = sqlite_path(url) if is_sqlite(url) else None
        if path is None:
            raise ConfigError("give the server's chunk store with --chunks DIR (it cannot be found from a URL)")
        directory = f"{path}.chunks"
    if not Path(directory).is_dir():
        raise ConfigError(f"no chunk store at {directory} (give it with --chunks DIR)")
    with LocalChunkStore(directory) as chunks:
        report = reaggregate(log, chunks, args.job, args.round)
    print(report.describe())
    return 0 if report.matches else 1
