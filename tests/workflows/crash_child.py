"""A server process for the SIGKILL test: runs FedAvg on a SQLite log until told where to stop.

``python -m tests.workflows.crash_child PATH STOP_AFTER`` serves the workflow with the
in-process sites until ``STOP_AFTER`` results were submitted and a site holds the next
task, prints ``ready``, and then waits to be killed.
"""

from __future__ import annotations

import asyncio
import sys

from engine.charts.loader import load_charts
from engine.clock import ManualClock
from engine.workflows import WorkflowRunner, fedavg
from tests.tasks.support import harness
from tests.workflows.support import SITES, serve

ARGS = {"model": {"w": [0.0, 1.0], "b": 0.5}, "rounds": 3}


async def main(path: str, stop_after: int) -> None:
    """Run until ``stop_after`` results are in, say so, and wait for SIGKILL."""
    async with harness(path, load_charts(), ManualClock()) as h:
        await h.connect(*SITES)
        runner = WorkflowRunner(h.manager, fedavg, job_id="j", args=ARGS)
        await runner.start()
        await serve(runner, h.manager, SITES, stop_after=stop_after)
        print("ready", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
