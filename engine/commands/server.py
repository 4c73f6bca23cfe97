"""``fedlog server``: serve the federation's jobs over HTTP, recovering from the log at start.

The log is the embedded default (``fedlog-server.db`` in the working directory) or
``--db URL`` (PostgreSQL). A second server on the same log is refused; one that was
killed is waited for (``--lease-wait``) because its lease ends with its process. The
first line on stdout is JSON (``{"event": "listening", "url", "port", "pid", "boot"}``)
so that scripts and simulations know where and when it is ready.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import orjson

from engine.errors import ConfigError
from engine.server.serve import add_arguments, options_from_args, serve_forever

if TYPE_CHECKING:
    from engine.server.service import FedServer, ServerSettings

__all__ = ["cmd_server", "register"]

DEFAULT_DB = "fedlog-server.db"


def register(sub: Any) -> None:
    """Add the ``server`` command."""
    parser = sub.add_parser("server", help="run the federation server (jobs, tasks, crash recovery)",
                            description="Serve jobs to the provisioned sites. Stop with Ctrl-C / SIGTERM; "
                                        "a killed server resumes its job from the log when started again.")
    add_arguments(parser)
    parser.add_argument("--db", default=DEFAULT_DB,
                        help=f"event log: SQLite path or postgresql:// URL (default {DEFAULT_DB})")
    parser.add_argument("--chunks", metavar="DIR",
                        help="the chunk store (default: DB.chunks beside a SQLite log, ./fedlog-chunks for a URL)")
    parser.add_argument("--heartbeat-timeout", type=float, default=60.0,
                        help="seconds without contact before a site is missing (default 60)")
    parser.add_argument("--dead-grace", type=float, default=60.0,
                        help="seconds a missing site has before it is dead (default 60)")
    parser.add_argument("--client-dead-grace", type=float, default=30.0,
                        help="seconds after scheduling before a task whose targets are all dead ends "
                             "CLIENT_DEAD (default 30)")
    parser.add_argument("--served-mib", type=int, default=256, metavar="MIB",
                        help="MiB of chunks held in memory for the sites downloading them, each read once "
                             "for all (default 256)")
    parser.add_argument("--served-idle", type=float, default=10.0, metavar="SECONDS",
                        help="seconds without a download before those are let go (default 10)")
    parser.add_argument("--lease-wait", type=float, default=15.0,
                        help="seconds to wait for a previous server's writer lease (default 15)")
    parser.add_argument("--preload", action="append", default=[], metavar="MODULE",
                        help="start the child that builds the next job's initial model now, importing MODULE "
                             "(e.g. the model's module, so torch is loaded before the job arrives); repeatable")
    parser.set_defaults(func=cmd_server)


def _open(args: argparse.Namespace, settings: ServerSettings) -> FedServer:
    from engine.errors import LeaseHeld
    from engine.server.service import FedServer

    deadline = time.monotonic() + args.lease_wait
    while True:
        try:
            return FedServer(args.db, args.credentials, settings=settings, chunks=args.chunks)
        except LeaseHeld:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


def cmd_server(args: argparse.Namespace) -> int:
    """Open the log, recover, and serve until SIGINT/SIGTERM."""
    if args.preload:
        # first: the child's torch import then overlaps this process's own (SQL layer, app);
        # the command line's entry point has usually started it already (a no-op then)
        from engine.workflows.warm import prewarm

        prewarm(args.preload)
    from engine.startup import importing

    with importing():
        from engine.server.http import Limits
        from engine.server.service import ServerSettings

    # checked before the log or the store is opened: a bad flag leaves nothing behind
    if args.served_mib < 0:
        raise ConfigError(f"--served-mib is a number of MiB >= 0, got {args.served_mib}")
    if not 0 < args.served_idle < math.inf:
        raise ConfigError(f"--served-idle is a number of seconds > 0, got {args.served_idle}")
    limits = Limits(max_json_bytes=args.max_json_bytes, max_octet_bytes=args.max_octet_bytes)
    settings = ServerSettings(heartbeat_timeout=args.heartbeat_timeout, dead_grace=args.dead_grace,
                              client_dead_grace=args.client_dead_grace, limits=limits,
                              served_bytes=args.served_mib << 20, served_idle_s=args.served_idle)
    options = options_from_args(args)
    server = _open(args, settings)

    def ready(url: str) -> None:
        line = {"event": "listening", "url": url, "port": int(url.rsplit(":", 1)[1]), "pid": os.getpid(),
                "boot": asdict(server.boot)}
        sys.stdout.write(orjson.dumps(line).decode() + "\n")
        sys.stdout.flush()

    serve_forever(server.app, options, ready, on_exit=server.begin_closing)
    # the app's shutdown closed the log and the chunk store: skip the interpreter's teardown,
    # which a stopping simulation or service manager would only wait for
    args.exit_now = True
    return 0
