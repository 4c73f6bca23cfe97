"""SIGKILL the demo driver (a real child process) at many points; the log must not notice.

Each scenario runs a seeded plan of job machines (with deploy timeouts) through the
crash harness: the driver is killed once the log reaches each chosen sequence number
(0 = the instant it was started), restarted, and finally left to finish. The log's
per-machine event sequences and final states must equal an uncrashed in-memory run
of the same plan, and the log must pass its own consistency checks.
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

from engine.demo.driver import demo_charts
from engine.demo.harness import Run, check_log, crash_runs, final_states, histories, reference_log
from engine.demo.plan import build_plan
from engine.log.sql import open_recorder


def _thresholds(total: int, count: int, rng: random.Random, *, at_once: bool) -> list[int]:
    # not in the last tenth: a run must not be able to finish between two looks at the log
    points = sorted(rng.sample(range(1, total * 9 // 10), count - int(at_once)))
    return [0, *points] if at_once else points


def _crash_and_compare(db: str, machines: int, seed: int, thresholds: list[int]) -> list[Run]:
    plan = build_plan(machines, seed)
    reference = reference_log(plan)
    runs = crash_runs(db, plan, thresholds, run_timeout_s=60)
    with open_recorder(db) as log:
        expected, actual = histories(reference), histories(log)
        assert sorted(actual) == sorted(expected)
        for machine_id, events in expected.items():
            assert actual[machine_id] == events, machine_id
        assert final_states(log) == final_states(reference)
        assert check_log(log, demo_charts()) == []
    return runs


@pytest.mark.parametrize("seed", [3, 17])
def test_sigkill_at_many_points_on_sqlite(tmp_path: Path, seed: int) -> None:
    machines = 120
    total = reference_log(build_plan(machines, seed)).last_seq()
    thresholds = _thresholds(total, 6, random.Random(seed), at_once=seed == 3)
    runs = _crash_and_compare(str(tmp_path / "demo.db"), machines, seed, thresholds)

    assert len(runs) == len(thresholds) + 1
    killed = [r for r in runs if r.killed]
    # a run can only escape its kill by finishing first, which the spread of points rules out
    assert len(killed) == len(thresholds)
    assert all(r.exit_code == -9 for r in killed)
    assert runs[-1].exit_code == 0 and runs[-1].reports["done"]["last_tick"] >= 1
    # every restart after the first real progress recovered from the log it found
    for before, after in zip(runs, runs[1:], strict=False):
        recovered = after.reports.get("recovered")
        if recovered is not None:
            assert recovered["events_in_log"] == before.killed_at_seq
    assert any(r.reports.get("recovered", {}).get("events_in_log", 0) > 0 for r in runs)


def test_sigkill_right_after_start_repeatedly(tmp_path: Path) -> None:
    runs = _crash_and_compare(str(tmp_path / "demo.db"), 40, 5, [0, 0, 0])
    assert [r.killed for r in runs] == [True, True, True, False]
    assert runs[-1].reports["recovered"]["events_in_log"] == 0


def test_sigkill_on_postgres(pg_url: str) -> None:
    machines, seed = 80, 23
    total = reference_log(build_plan(machines, seed)).last_seq()
    thresholds = _thresholds(total, 3, random.Random(seed), at_once=False)
    runs = _crash_and_compare(pg_url, machines, seed, thresholds)
    assert sum(r.killed for r in runs) == 3
    assert runs[-1].reports["recovered"]["events_in_log"] > 0


def test_a_second_driver_refuses_to_drive_a_leased_log(tmp_path: Path) -> None:
    db = str(tmp_path / "demo.db")
    with open_recorder(db, lease_holder="the other driver") as holder:
        proc = subprocess.run(
            [sys.executable, "-m", "engine.demo", "--db", db, "--machines", "5", "--lease-wait", "0"],
            capture_output=True, text=True, timeout=60, check=False,
        )
        assert proc.returncode == 3
        assert "the other driver" in proc.stderr and "refusing to start" in proc.stderr
        assert holder.last_seq() == 0
