"""``fedlog simulate JOB --clients N``: run a job on a real server and N real client processes."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import orjson

from engine.jobs.catalog import CATALOG, load_spec
from engine.sim import SimOptions, format_summary, simulate

__all__ = ["cmd_simulate", "register"]

_EXAMPLES = """\
examples:
  fedlog simulate fedstats --clients 3
  fedlog simulate linreg --clients 3 --kill-server-at 1.result --kill-server-at 3.aggregate
  fedlog simulate linreg --clients 4 --kill-server-random 7 --kill-client-random 8 --json
  fedlog simulate my-job.yaml --clients 2 --db postgresql://postgres@127.0.0.1:5432/test
"""


def register(sub: Any) -> None:
    """Add the ``simulate`` command."""
    parser = sub.add_parser(
        "simulate", help="run a job on a local server and N client processes (optionally killing them)",
        description=f"JOB is a JSON/YAML job spec or a built-in job: {', '.join(CATALOG)}. Server and sites are "
                    "separate processes on loopback, each with its own log; kills are SIGKILL and the killed "
                    "process is started again at once.",
        epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job", metavar="JOB")
    parser.add_argument("--clients", type=int, default=2, help="number of client sites (default 2)")
    parser.add_argument("--db", help="server log URL (default: SQLite in the work folder)")
    parser.add_argument("--workdir", type=Path, help="keep everything in this folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary work folder and print its path")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    parser.add_argument("--kill-server-at", action="append", default=[], metavar="ROUND.PHASE",
                        help="SIGKILL the server at this point (phase: dispatch, result, aggregate); repeatable")
    parser.add_argument("--kill-server-after", action="append", type=float, default=[], metavar="SECONDS",
                        help="SIGKILL the server this long after submission; repeatable")
    parser.add_argument("--kill-server-after-events", action="append", type=int, default=[], metavar="N",
                        help="SIGKILL the server once N of its events are durable (counted from its start; "
                             "the same instant of the job however fast it runs); repeatable, one per start")
    parser.add_argument("--kill-server-random", action="append", type=int, default=[], metavar="SEED",
                        help="SIGKILL the server at several random log positions chosen by SEED; repeatable")
    parser.add_argument("--kill-site-at", action="append", default=[], metavar="SITE:ROUND.PHASE",
                        help="SIGKILL a site (or * for every site) at a crash point and start it again; swarm "
                             "phases: train, upload, gather, scatter; repeatable")
    parser.add_argument("--leave-site-at", action="append", default=[], metavar="SITE:ROUND.PHASE",
                        help="like --kill-site-at, but the site is not started again (it left for good)")
    parser.add_argument("--kill-client-random", action="append", type=int, default=[], metavar="SEED",
                        help="SIGKILL random sites at random log positions chosen by SEED; repeatable")
    parser.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds")
    parser.add_argument("--process-per-site", action="store_true",
                        help="start every site in a process of its own (default: sites no kill touches share "
                             "one process, a thread each, so torch is imported once)")
    parser.set_defaults(func=cmd_simulate)


def cmd_simulate(args: argparse.Namespace) -> int:
    """Run the simulation; exit 0 only if the job finished."""
    options = SimOptions(spec=load_spec(args.job), clients=args.clients, workdir=args.workdir, db=args.db,
                         kill_server_at=args.kill_server_at, kill_server_after=args.kill_server_after,
                         kill_server_after_events=args.kill_server_after_events,
                         kill_server_random=args.kill_server_random, kill_client_random=args.kill_client_random,
                         kill_site_at=args.kill_site_at, leave_site_at=args.leave_site_at,
                         timeout=args.timeout, keep=args.keep, progress=sys.stderr,
                         process_per_site=args.process_per_site)
    summary = simulate(options)
    if args.json:
        print(orjson.dumps(summary).decode())
    else:
        print(format_summary(summary))
    return 0 if summary["status"] == "finished" else 1
