"""``fedlog job submit|list|show|result|abort``: the admin's view of the server's jobs.

Calls go to the server named in the admin's provisioned folder (``--identity``,
default ``$FEDLOG_ADMIN`` or ``fed/admin``) unless ``--server`` says otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import orjson

from engine.client.api import AdminApi, transport_for
from engine.jobs.catalog import CATALOG, load_spec

__all__ = ["cmd_job", "register"]

_TERMINAL = ("finished", "failed", "aborted")


def register(sub: Any) -> None:
    """Add the ``job`` command."""
    parser = sub.add_parser("job", help="submit, list, show and abort jobs on a running server")
    parser.add_argument("--identity", default=os.environ.get("FEDLOG_ADMIN", "fed/admin"), metavar="DIR",
                        help="the admin's provisioned folder (default $FEDLOG_ADMIN or fed/admin)")
    parser.add_argument("--server", metavar="URL", help="server URL (default: the provisioned one)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    submit = actions.add_parser("submit", help="submit a job spec",
                                description=f"SPEC is a JSON/YAML file or a built-in job: {', '.join(CATALOG)}")
    submit.add_argument("spec", metavar="SPEC")
    submit.add_argument("--wait", action="store_true", help="wait until the job ends; exit 1 unless it finished")
    actions.add_parser("list", help="list jobs")
    for name, text in (("show", "show a job and its progress"), ("result", "print a finished job's result")):
        sp = actions.add_parser(name, help=text)
        sp.add_argument("job_id")
    abort = actions.add_parser("abort", help="abort a job")
    abort.add_argument("job_id")
    abort.add_argument("--reason", help="recorded with the abort")
    parser.set_defaults(func=cmd_job)


def _line(job: dict[str, Any]) -> str:
    extra = f"  ({job['reason']})" if job.get("reason") else ""
    task = job.get("current_task")
    progress = f"  task {task['task_id']} {task['results']}/{len(task['targets'])}" if task else ""
    return f"{job['job_id']:<10} {job['state']:<10} rounds {job.get('rounds', 0):<3} {job['name']}{progress}{extra}"


def wait_for(admin: AdminApi, job_id: str, *, wait: float = 10.0, out: Any = sys.stderr) -> dict[str, Any]:
    """Follow the job until it ends, printing progress when it changes; return the job.

    Each look is a long poll that the server answers when the job changed (or after
    ``wait`` seconds), so progress shows at once and an idle job costs nothing.
    """
    last, seen = "", None
    while True:
        job, seen = admin.watch_job(job_id, seen, wait)
        text = _line(job)
        if text != last:
            print(text, file=out, flush=True)
            last = text
        if job["state"] in _TERMINAL:
            return job


def cmd_job(args: argparse.Namespace) -> int:
    """Run one job action against the server."""
    transport, _ = transport_for(args.identity, args.server)
    admin = AdminApi(transport)
    try:
        out: Any
        if args.action == "submit":
            out = admin.submit_job(load_spec(args.spec))
            if args.wait:
                out = wait_for(admin, out["job_id"])
        elif args.action == "list":
            out = admin.list_jobs()
        elif args.action == "show":
            out = admin.show_job(args.job_id)
        elif args.action == "result":
            out = admin.job_result(args.job_id)
        else:
            out = admin.abort_job(args.job_id, args.reason)
    finally:
        transport.close()
    if args.json or args.action == "result":
        print(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())
    elif isinstance(out, list):
        for job in out:
            print(_line(job))
        if not out:
            print("no jobs")
    else:
        print(_line(out))
    if args.action == "submit" and args.wait:
        return 0 if out["state"] == "finished" else 1
    return 0
