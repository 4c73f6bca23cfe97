"""FEDLOG_CRASH_AFTER_APPENDS: a process SIGKILLs itself once that many of its events are durable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from engine.log.sql import open_recorder

CHILD = """
import sys
from engine.charts.loader import load_charts
from engine.clock import SystemClock
from engine.log.sql import open_recorder
from engine.machines.runtime import Runtime
log = open_recorder(sys.argv[1], lease_holder="child")
runtime = Runtime(log, load_charts(), clock=SystemClock(), run_timers=False)
for i in range(10):
    runtime.create("audit", machine_id=f"m{i}")
    print(i, flush=True)
"""


def test_the_process_dies_right_after_its_nth_durable_event(tmp_path: Path) -> None:
    db = tmp_path / "log.db"
    done = subprocess.run([sys.executable, "-c", CHILD, str(db)], capture_output=True, text=True,
                          env={**os.environ, "FEDLOG_CRASH_AFTER_APPENDS": "4"}, check=False)
    assert done.returncode == -signal.SIGKILL
    # four events are durable, and the code that fired the fourth never went on
    assert done.stdout.split() == ["0", "1", "2"]
    with open_recorder(db) as log:
        assert [e.machine_id for e in log.read()] == ["m0", "m1", "m2", "m3"]


@pytest.mark.parametrize("bad", ["0", "-2", "lots"])
def test_a_bad_limit_is_refused_at_start(tmp_path: Path, bad: str) -> None:
    done = subprocess.run([sys.executable, "-c", "import engine.faults"], capture_output=True, text=True,
                          env={**os.environ, "FEDLOG_CRASH_AFTER_APPENDS": bad}, check=False)
    assert done.returncode == 1 and "FEDLOG_CRASH_AFTER_APPENDS must be a number of events >= 1" in done.stderr
