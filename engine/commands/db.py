"""``fedlog db upgrade|current|check DB``: the schema of an event log database."""

from __future__ import annotations

import argparse
from typing import Any

from engine.errors import SchemaError
from engine.log import migrate
from engine.log.target import describe, to_url


def register(sub: Any) -> None:
    """Add the ``db`` command."""
    parser = sub.add_parser("db", help="create, upgrade and check the log database schema")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    up = actions.add_parser("upgrade", help="upgrade (or create) the schema to this fedlog's version")
    up.add_argument("db", metavar="DB", help="SQLite path or SQLAlchemy URL")
    up.add_argument("--revision", default="head", help="target revision (default: head)")
    up.set_defaults(func=cmd_upgrade)
    cur = actions.add_parser("current", help="print the schema revision of the database")
    cur.add_argument("db", metavar="DB")
    cur.set_defaults(func=cmd_current)
    chk = actions.add_parser("check", help="exit 1 if the schema differs from what this fedlog expects")
    chk.add_argument("db", metavar="DB")
    chk.set_defaults(func=cmd_check)


def cmd_upgrade(args: argparse.Namespace) -> int:
    url = to_url(args.db)
    before = migrate.status(url).current
    after = migrate.upgrade(url, args.revision).current
    if before == after:
        print(f"{describe(url)}: already at revision {after}")
    else:
        print(f"{describe(url)}: upgraded {before or 'empty'} -> {after}")
    return 0


def cmd_current(args: argparse.Namespace) -> int:
    url = to_url(args.db)
    st = migrate.status(url)
    note = "up to date" if st.up_to_date else ("newer than this fedlog" if not st.known else f"behind head {st.head}")
    print(f"{describe(url)}: revision {st.current or 'none (empty database)'} ({note})")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    url = to_url(args.db)
    try:
        diffs = migrate.check(url)
    except SchemaError as exc:
        print(f"fedlog db check: {exc}")
        return 1
    if diffs:
        print(f"{describe(url)}: schema differs from this fedlog's metadata:")
        for diff in diffs:
            print(f"  {diff}")
        return 1
    print(f"{describe(url)}: schema matches (revision {migrate.status(url).current})")
    return 0
