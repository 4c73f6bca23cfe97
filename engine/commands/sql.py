"""``fedlog sql DB "SELECT ..." [--format table|csv|json]``: query a log database.

The tables (``events``, ``machine_states``) and the readable views (``transitions``,
``machines``) are plain SQL in both dialects. The statement runs in a transaction
that is rolled back: this command reads (see ``engine.history.query``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from engine.history.query import run_query
from engine.history.render import FORMATS, write_rows

__all__ = ["cmd_sql", "register"]

_EXAMPLES = """\
examples:
  fedlog sql fedlog.db "SELECT machine_id, kind, state, deadline FROM machines WHERE NOT terminal"
  fedlog sql fedlog.db "SELECT seq, at, machine_id, trigger, source, dest FROM transitions ORDER BY seq DESC LIMIT 20"
  fedlog sql postgresql://fed@db/fedlog "SELECT kind, state, count(*) FROM machines GROUP BY 1, 2" --format csv
"""


def register(sub: Any) -> None:
    """Add the ``sql`` command."""
    parser = sub.add_parser(
        "sql",
        help="run one SQL query on a log database and print the rows",
        description="Run one SQL statement on an existing log database and print its rows. "
                    "Views: transitions (readable event history), machines (current states).",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("db", metavar="DB", help="SQLite path or SQLAlchemy URL of an existing database")
    parser.add_argument("query", metavar="SQL", help="one SQL statement (quote it)")
    parser.add_argument("--format", choices=FORMATS, default="table", help="output format (default: table)")
    parser.set_defaults(func=cmd_sql)


def cmd_sql(args: argparse.Namespace) -> int:
    """Run ``fedlog sql``; return 1 for a statement that returns no rows (its effects are undone)."""
    with run_query(args.db, args.query) as result:
        if result.returns_rows:
            write_rows(args.format, result.columns, result.rows, sys.stdout)
            return 0
        affected = f"{result.rowcount} row(s) affected, " if result.rowcount is not None else ""
    print(
        f"fedlog sql: the statement returned no rows ({affected}rolled back): fedlog sql only "
        "reads, it never commits changes to the log",
        file=sys.stderr,
    )
    return 1
