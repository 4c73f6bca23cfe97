"""``fedlog client``: run one site — poll the server, execute tasks, submit results.

The site's identity folder (from ``fedlog provision``) holds its token and the
server URL. Its local log (default ``<identity>/site.db``) records every assignment
and computed result, so a restarted client re-submits instead of recomputing.

``--identity`` may be given several times: the sites then run in one process, each
on its own thread with its own log, chunk store and connection, sharing one import
of the ML stack (torch: ~1 s of CPU and ~250 MiB per process). ``fedlog simulate``
hosts the sites it does not disturb that way; a site with crash points gets a
process of its own, since a SIGKILL takes the whole process.
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

from engine.client.agent import AgentStats, Backoff, SiteAgent
from engine.client.api import SiteApi, transport_for
from engine.client.executor import Executor, load_callable
from engine.errors import ConfigError
from engine.startup import importing

__all__ = ["cmd_client", "register"]

logger = logging.getLogger(__name__)


def register(sub: Any) -> None:
    """Add the ``client`` command."""
    parser = sub.add_parser("client", help="run a client site (poll for tasks, run the executor, submit)",
                            description="Serve one site until Ctrl-C / SIGTERM.")
    parser.add_argument("--identity", required=True, action="append", metavar="DIR",
                        help="the site's provisioned folder (holds its token and the server URL); repeat it "
                             "to run several sites in this process, one thread each")
    parser.add_argument("--server", metavar="URL", help="server URL (default: the provisioned one)")
    parser.add_argument("--log", action="append", metavar="PATH",
                        help="the site's local log (default DIR/site.db); one per --identity, in order")
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
                with importing():
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


def _serve(agent: SiteAgent, idle_exit: float | None) -> AgentStats:
    try:
        return agent.run(idle_exit=idle_exit)
    except KeyboardInterrupt:
        agent.stop()
        return agent.stats


def _serve_together(agents: list[SiteAgent], idle_exit: float | None) -> list[AgentStats]:
    """Run each agent on its own thread; one that fails stops the others (the process exits with it)."""
    results: list[AgentStats | None] = [None] * len(agents)
    errors: list[BaseException] = []

    def serve(i: int) -> None:
        try:
            results[i] = agents[i].run(idle_exit=idle_exit)
        except BaseException as exc:  # noqa: BLE001 - re-raised on the main thread below
            errors.append(exc)
            for other in agents:
                other.stop()

    threads = [threading.Thread(target=serve, args=(i,), name=f"site-agent-{i}") for i in range(len(agents))]
    for thread in threads:
        thread.start()
    try:
        while any(t.is_alive() for t in threads):
            for thread in threads:
                thread.join(0.2)
    except KeyboardInterrupt:
        for agent in agents:
            agent.stop()
        for thread in threads:
            thread.join()
    if errors:
        raise errors[0]
    return [r if r is not None else a.stats for r, a in zip(results, agents, strict=True)]


def cmd_client(args: argparse.Namespace) -> int:
    """Run the site agent(s) until stopped; print each site's counts as one JSON line at the end."""
    identities: list[str] = args.identity
    logs: list[str] = args.log or []
    if logs and len(logs) != len(identities):
        raise ConfigError(f"give one --log per --identity: {len(identities)} identities, {len(logs)} logs")
    if len(set(identities)) != len(identities):
        raise ConfigError("the same --identity was given twice")
    executor = _executor(args)
    agents: list[tuple[str, SiteAgent, Any]] = []
    try:
        for i, identity in enumerate(identities):
            transport, site = transport_for(identity, args.server)
            log = logs[i] if logs else str(Path(identity) / "site.db")
            agent = SiteAgent(SiteApi(transport, site), log, executor=executor, poll_wait=args.poll_wait,
                              backoff=Backoff(cap=args.backoff_cap))
            agents.append((site, agent, transport))
    except BaseException:
        for _, agent, transport in agents:
            agent.close()
            transport.close()
        raise

    def stop_all(*_: Any) -> None:
        for entry in agents:
            entry[1].stop()

    signal.signal(signal.SIGTERM, stop_all)
    # after the agents exist (their logs open, charts parsed): the import would slow that
    # start-up down (one GIL), and the first task is further off than the agents' first poll
    _preload(args.preload)
    if len(agents) == 1:
        results = [_serve(agents[0][1], args.exit_when_idle)]
    else:
        results = _serve_together([agent for _, agent, _ in agents], args.exit_when_idle)
    for (site, agent, transport), stats in zip(agents, results, strict=True):
        agent.close()
        transport.close()
        sys.stdout.write(orjson.dumps({"event": "stopped", "site": site, **stats.__dict__}).decode() + "\n")
    # everything is closed and durable: skip the interpreter's teardown (with torch loaded it took
    # ~0.9 s, time a stopping simulation or service manager waits for nothing)
    args.exit_now = True
    return 0
