"""``fedlog client``: run one site — poll the server, execute tasks, submit results.

The site's identity folder (from ``fedlog provision``) holds its token and the
server URL. Its local log (default ``<identity>/site.db``) records every assignment
and computed result, so a restarted client re-submits instead of recomputing.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import orjson

from engine.client.agent import Backoff, SiteAgent
from engine.client.api import SiteApi, transport_for
from engine.client.executor import Executor, load_callable

__all__ = ["cmd_client", "register"]

logger = logging.getLogger(__name__)


def register(sub: Any) -> None:
    """Add the ``client`` command."""
    parser = sub.add_parser("client", help="run a client site (poll for tasks, run the executor, submit)",
                            description="Serve one site until Ctrl-C / SIGTERM.")
    parser.add_argument("--identity", required=True, metavar="DIR",
                        help="the site's provisioned folder (holds its token and the server URL)")
    parser.add_argument("--server", metavar="URL", help="server URL (default: the provisioned one)")
    parser.add_argument("--log", metavar="PATH", help="the site's local log (default DIR/site.db)")
    parser.add_argument("--executor", metavar="MODULE:FUNCTION",
                        help="run this for every task instead of the job's executor")
    parser.add_argument("--executor-pickle", metavar="FILE", type=Path,
                        help="a cloudpickled executor written by a simulation this same user started "
                             "(trusted local files only; never use one from elsewhere)")
    parser.add_argument("--preload", action="append", default=[], metavar="MODULE",
                        help="import MODULE in the background at start (e.g. the job's executor module, so "
                             "torch is loaded before the first task arrives); repeatable")
    parser.add_argument("--poll-wait", type=float, default=20.0, help="seconds a poll waits for work")
    parser.add_argument("--backoff-cap", type=float, default=5.0,
                        help="longest wait between reconnection attempts, seconds (default 5)")
    parser.add_argument("--exit-when-idle", type=float, metavar="SECONDS",
                        help="exit after this long without work (default: serve until stopped)")
    parser.set_defaults(func=cmd_client)


def _executor(args: argparse.Namespace) -> Executor | None:
    if args.executor:
        return load_callable(args.executor, "--executor")
    if args.executor_pickle:
        import cloudpickle

        with open(args.executor_pickle, "rb") as fh:
            fn: Executor = cloudpickle.load(fh)
        return fn
    return None


def _preload(modules: list[str]) -> threading.Thread | None:
    """Import ``modules`` on a background thread (the first task's import waits for it, not longer).

    A preloaded module may define ``warm_up()``: it is called there too, so one-time costs
    of the first task (a framework's lazy initialisation: torch's first training step
    took ~0.9 s of which ~0.8 s is paid once) are paid while the site waits for work.
    """
    def run() -> None:
        for name in modules:
            try:
                module = importlib.import_module(name)
                warm_up = getattr(module, "warm_up", None)
                if callable(warm_up):
                    warm_up()
            except Exception as exc:  # noqa: BLE001 - a warm-up only: the task reports the real error
                logger.warning("--preload %s failed: %s", name, exc)

    if not modules:
        return None
    thread = threading.Thread(target=run, name="preload", daemon=True)
    thread.start()
    return thread


def cmd_client(args: argparse.Namespace) -> int:
    """Run the site agent until stopped; print its counts as one JSON line at the end."""
    _preload(args.preload)
    transport, site = transport_for(args.identity, args.server)
    log = args.log or str(Path(args.identity) / "site.db")
    agent = SiteAgent(SiteApi(transport, site), log, executor=_executor(args), poll_wait=args.poll_wait,
                      backoff=Backoff(cap=args.backoff_cap))
    signal.signal(signal.SIGTERM, lambda *_: agent.stop())
    try:
        stats = agent.run(idle_exit=args.exit_when_idle)
    except KeyboardInterrupt:
        stats = agent.stats
    finally:
        agent.close()
        transport.close()
    sys.stdout.write(orjson.dumps({"event": "stopped", "site": site, **stats.__dict__}).decode() + "\n")
    # everything is closed and durable: skip the interpreter's teardown (with torch loaded it took
    # ~0.9 s, time a stopping simulation or service manager waits for nothing)
    args.exit_now = True
    return 0
