"""Kill a real server process with SIGKILL mid-round; a new process finishes the job with the same result."""

from __future__ import annotations

import asyncio
import os
import select
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from engine.charts.registry import ChartRegistry
from engine.clock import ManualClock
from engine.workflows import WorkflowRunner, fedavg
from tests.tasks.support import harness
from tests.workflows.crash_child import ARGS
from tests.workflows.support import SITES, records, results_per_share, serve
from tests.workflows.test_builtin import FEDAVG_3

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("stop_after", [2, 7])
def test_fedavg_survives_a_sigkilled_server(sqlite_path: str, charts: ChartRegistry, stop_after: int) -> None:
    child = subprocess.Popen([sys.executable, "-m", "tests.workflows.crash_child", sqlite_path, str(stop_after)],
                             cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        ready, _, _ = select.select([child.stdout], [], [], 60)  # a deadline, not a pause
        assert ready, "the server process never reached the kill point"
        assert child.stdout.readline().strip() == "ready"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
        if child.stdout is not None:
            child.stdout.close()

    async def after() -> Any:
        async with harness(sqlite_path, charts, ManualClock()) as h:
            runner = WorkflowRunner(h.manager, fedavg, job_id="j", args=ARGS)
            await runner.recover_and_start()
            assert await serve(runner, h.manager, SITES) == 9 - stop_after
            assert sorted(results_per_share(h.recorder, "j").values()) == [1] * 9
            assert [r["call"] for r in records(h.recorder, "j") if r["op"] == "publish"] == [2, 5, 8]
            return await runner.result()

    assert asyncio.run(after()) == FEDAVG_3
