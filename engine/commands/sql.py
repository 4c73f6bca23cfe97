"""``fedlog sql DB ["SELECT ..."] [--format table|csv|json] [--views] [--write]``: query a log database.

The tables (``events``, ``machine_states``) and the views (``transitions``, ``machines``
and the history views ``jobs``, ``rounds``, ``tasks``, ``client_tasks``, ``streams``,
``sites``; see docs/history.md) are plain SQL in both dialects. Without a statement an
interactive prompt opens (history, multi-line input ended by ``;``). Read-only by
default: a statement that would write is refused before it runs, and the database is
opened read-only besides; ``--write`` commits.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Any, TextIO

from engine.errors import EngineError
from engine.history.query import list_views, run_query
from engine.history.render import FORMATS, write_rows

__all__ = ["cmd_sql", "register"]

_EXAMPLES = """\
examples:
  fedlog sql fedlog.db "SELECT machine_id, kind, state, deadline FROM machines WHERE NOT terminal"
  fedlog sql fedlog.db "SELECT seq, at, machine_id, trigger, source, dest FROM transitions ORDER BY seq DESC LIMIT 20"
  fedlog sql postgresql://fed@db/fedlog "SELECT kind, state, count(*) FROM machines GROUP BY 1, 2" --format csv
  fedlog sql fedlog.db "SELECT round, duration_s, responses_received FROM rounds WHERE job_id = 'job-1'"
  fedlog sql fedlog.db --views
  fedlog sql fedlog.db                  # interactive: end each statement with ;  (.views, .quit)
"""

HISTORY_ENV = "FEDLOG_SQL_HISTORY"
PROMPT, MORE = "fedlog> ", "   ...> "


def register(sub: Any) -> None:
    """Add the ``sql`` command."""
    parser = sub.add_parser(
        "sql",
        help="query a log database with SQL (one statement, or an interactive prompt)",
        description="Run SQL on an existing log database and print the rows. Views: transitions, machines, "
                    "jobs, rounds, tasks, client_tasks, streams, sites (docs/history.md). Without SQL, an "
                    "interactive prompt opens. Read-only unless --write.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("db", metavar="DB", help="SQLite path or SQLAlchemy URL of an existing database")
    parser.add_argument("query", metavar="SQL", nargs="?", help="one SQL statement (quote it); omit for a prompt")
    parser.add_argument("--format", choices=FORMATS, default="table", help="output format (default: table)")
    parser.add_argument("--views", action="store_true", help="list the views and their columns")
    parser.add_argument("--write", action="store_true",
                        help="allow a statement that changes the database, and commit it")
    parser.set_defaults(func=cmd_sql)


def _run(db: str, sql: str, fmt: str, write: bool, out: TextIO) -> int:
    with run_query(db, sql, write=write) as result:
        if result.returns_rows:
            write_rows(fmt, result.columns, result.rows, out)
            return 0
        affected = f"{result.rowcount} row(s) affected" if result.rowcount is not None else "done"
    if write:
        print(f"{affected}; committed", file=sys.stderr)
        return 0
    print(f"fedlog sql: the statement returned no rows ({affected}, rolled back)", file=sys.stderr)
    return 1


def _print_views(db: str, out: TextIO) -> None:
    for name, columns in list_views(db):
        out.write(f"{name}: {', '.join(columns)}\n")


def _history_file() -> Path:
    return Path(os.environ.get(HISTORY_ENV) or Path.home() / ".fedlog_sql_history")


def interactive(db: str, fmt: str, write: bool, stdin: TextIO | None = None, out: TextIO | None = None) -> int:
    """A prompt: statements end with ';' and may span lines; errors are shown and the prompt goes on."""
    stdin = stdin or sys.stdin
    out = out or sys.stdout
    tty = stdin.isatty()
    readline: Any = None
    if tty:
        try:
            import readline as _readline

            readline = _readline
            history = _history_file()
            if history.exists():
                readline.read_history_file(str(history))
        except (ImportError, OSError):
            readline = None
        print(f"fedlog sql on {db} ({'read-write' if write else 'read-only'}); end statements with ';', "
              ".views lists the views, .quit leaves", file=out)
    buffer: list[str] = []
    status = 0
    while True:
        try:
            line = input(MORE if buffer else PROMPT) if tty else stdin.readline()
        except EOFError:
            break
        except KeyboardInterrupt:
            buffer = []
            print(file=out)
            continue
        if not tty and line == "":
            break
        line = line.rstrip("\n")
        if not buffer and line.strip() in (".quit", ".exit", "\\q"):
            break
        if not buffer and line.strip() == ".views":
            _print_views(db, out)
            continue
        if not line.strip() and not buffer:
            continue
        buffer.append(line)
        if not line.rstrip().endswith(";"):
            continue
        statement = "\n".join(buffer).strip().rstrip(";")
        buffer = []
        try:
            status = _run(db, statement, fmt, write, out)
        except EngineError as exc:
            print(f"error: {exc}", file=out)
            status = 1
        out.flush()
    if buffer:  # a last statement without ';'
        try:
            status = _run(db, "\n".join(buffer).strip(), fmt, write, out)
        except EngineError as exc:
            print(f"error: {exc}", file=out)
            status = 1
    if readline is not None:
        with contextlib.suppress(OSError):
            readline.write_history_file(str(_history_file()))
    return status


def cmd_sql(args: argparse.Namespace) -> int:
    """Run ``fedlog sql``; exit 1 for a statement that returns no rows without --write (it was undone)."""
    if args.views:
        _print_views(args.db, sys.stdout)
        return 0
    if args.query is None:
        return interactive(args.db, args.format, args.write)
    return _run(args.db, args.query, args.format, args.write, sys.stdout)
