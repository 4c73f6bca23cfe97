"""The stdlib reader of a SQLite log counts what the SQL layer recorded."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from engine.charts.loader import load_charts
from engine.clock import ManualClock
from engine.log.peek import count_triggers
from engine.log.sql import open_recorder
from engine.machines.runtime import Runtime


def test_count_triggers_matches_the_events_the_recorder_holds(tmp_path: Path) -> None:
    path = tmp_path / "site.db"
    with open_recorder(path) as log:
        runtime = Runtime(log, load_charts(), clock=ManualClock(), writer="t", run_timers=False)
        for i in range(3):
            runtime.create("site_task", machine_id=f"ct-{i}", data={"task_id": "t", "name": "train",
                                                                     "send_count": 1, "executor": None})
            runtime.fire(f"ct-{i}", "compute", {"result": i})
        runtime.fire("ct-0", "acknowledge", {"outcome": "ok"})
        runtime.close()
        expected = Counter(e.trigger for e in log.read() if e.kind == "site_task")
    assert count_triggers(path, "site_task") == dict(expected) == {"create": 3, "compute": 3, "acknowledge": 1}
    assert count_triggers(path, "no_such_kind") == {}
