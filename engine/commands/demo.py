"""``fedlog demo``: drive job machines, SIGKILL the driver part-way, restart it, check the result."""

from __future__ import annotations

import argparse
from typing import Any

from engine.demo.report import run_demo


def register(sub: Any) -> None:
    """Add the ``demo`` command."""
    parser = sub.add_parser(
        "demo",
        help="crash-recovery demo: kill -9 a driver of a few hundred machines, restart, compare",
        description=(
            "Drives a few hundred job machines through their lifecycles (with deploy timeouts) "
            "from a seeded plan, in a child process on a fresh log; SIGKILLs it at random points, "
            "restarts it each time, lets it finish, prints what every restart recovered, and checks "
            "that the log is identical to an uncrashed run of the same plan (exit 1 if not)."
        ),
    )
    parser.add_argument("--db", metavar="PATH",
                        help="a fresh SQLite file or PostgreSQL URL (default: a new temporary directory)")
    parser.add_argument("--machines", type=int, default=300, metavar="N", help="job machines (default 300)")
    parser.add_argument("--seed", type=int, default=1, metavar="S", help="seed of the plan (default 1)")
    parser.add_argument("--kills", type=int, default=3, metavar="K", help="SIGKILLs before letting it finish (default 3)")
    parser.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo; exit 0 when the crashed log equals the uncrashed run, else 1."""
    outcome = run_demo(args.db, args.machines, args.seed, args.kills)
    return 0 if outcome.identical else 1
