"""The demo's plan, its resumable driver, its comparison, and ``fedlog demo`` itself."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from engine.cli import main
from engine.demo import report
from engine.demo.driver import demo_charts, drive
from engine.demo.harness import check_log, final_states, first_difference, histories, reference_log
from engine.demo.plan import Plan, build_plan
from engine.errors import EngineError
from engine.log.memory import MemoryRecorder
from engine.log.recorder import AppendResult, EventRecorder, MachineRow, NewEvent, StoredEvent
from engine.log.sql import open_recorder


class Cut(Exception):
    """Stands for the process dying: raised instead of committing a batch."""


class CuttingRecorder(EventRecorder):
    """Passes everything to ``inner`` until ``limit`` events are in the log, then refuses."""

    def __init__(self, inner: EventRecorder, limit: int) -> None:
        self.inner = inner
        self.limit = limit
        self.target = "cutting"

    def append(self, batch: Sequence[NewEvent]) -> list[AppendResult]:
        if self.inner.last_seq() + len(batch) > self.limit:
            raise Cut  # the whole batch is lost, as an uncommitted transaction is
        return self.inner.append(batch)

    def read(self, **kwargs: Any) -> Iterator[StoredEvent]:
        return self.inner.read(**kwargs)

    def get_machine(self, machine_id: str) -> MachineRow | None:
        return self.inner.get_machine(machine_id)

    def machines(self, **kwargs: Any) -> list[MachineRow]:
        return self.inner.machines(**kwargs)

    def timers(self) -> list[tuple[int, str, int]]:
        return self.inner.timers()

    def last_seq(self) -> int:
        return self.inner.last_seq()


def test_plan_is_deterministic_and_per_machine() -> None:
    assert build_plan(50, 7) == build_plan(50, 7)
    assert build_plan(50, 7).actions != build_plan(50, 8).actions
    small, large = build_plan(10, 7), build_plan(50, 7)
    # machine i's script does not depend on how many machines there are
    assert [a for a in large.actions if a.machine_id < "job-0010"] == list(small.actions)
    for plan in (small, large):
        ticks: dict[str, list[int]] = {}
        for action in plan.actions:
            ticks.setdefault(action.machine_id, []).append(action.tick)
        assert all(t == sorted(set(t)) for t in ticks.values())  # at most one action per tick
        assert all(plan.tick_of(plan.time_us(t)) == t for t in range(plan.last_tick + 1))


def test_uncrashed_run_ends_every_machine_and_exercises_timers() -> None:
    log = reference_log(build_plan(200, 1))
    states = final_states(log)
    assert len(states) == 200
    assert all(terminal for _, _, terminal, _ in states.values())
    triggers = {e.trigger for e in log.read()}
    assert {"create", "deploy", "start", "finish", "fail", "abort", "timeout"} <= triggers
    assert check_log(log, demo_charts()) == []
    assert histories(reference_log(build_plan(200, 1))) == histories(log)


def test_driver_resumes_after_being_cut_at_any_batch() -> None:
    plan = build_plan(60, 4)
    expected = reference_log(plan)
    total = expected.last_seq()
    log = MemoryRecorder()
    cuts = 0
    mid_tick: list[bool] = []
    for limit in range(0, total + 5, 7):
        try:
            drive(CuttingRecorder(log, limit), plan, concurrency=4,
                  on_resumed=lambda r: mid_tick.append(r.mid_tick))
        except Cut:
            cuts += 1
            assert log.last_seq() <= limit
        else:
            break
    drive(log, plan)  # whatever is left (nothing, if the last attempt finished)
    assert cuts >= total // 7 - 1
    assert sum(mid_tick) > cuts // 2  # most cuts land inside a tick, part of it done
    assert first_difference(histories(expected), histories(log)) is None
    assert final_states(log) == final_states(expected)


def test_driver_resumes_on_sqlite_from_a_cut(tmp_path: Path) -> None:
    plan = build_plan(40, 9)
    db = str(tmp_path / "demo.db")
    with open_recorder(db) as log:
        with pytest.raises(Cut):
            drive(CuttingRecorder(log, 61), plan)
        assert log.last_seq() <= 61
    with open_recorder(db) as log:
        result = drive(log, plan)
        assert result.resumed.events_in_log == log.last_seq() - result.appended
        assert histories(log) == histories(reference_log(plan))


def test_driver_refuses_a_log_of_another_plan(tmp_path: Path) -> None:
    log = reference_log(build_plan(5, 1))
    with pytest.raises(EngineError, match="not written by a demo with seed 2"):
        drive(log, build_plan(5, 2))


def test_first_difference_and_log_checks_find_tampering() -> None:
    log = reference_log(build_plan(20, 3))
    good = histories(log)
    assert first_difference(good, good) is None
    bad = {m: list(events) for m, events in good.items()}
    version, trigger, *rest = bad["job-0004"][1]
    bad["job-0004"][1] = (version, "abort", *rest)
    assert first_difference(good, bad) is not None
    assert "job-0004, event 2" in str(first_difference(good, bad))
    del bad["job-0007"]
    assert first_difference(good, {m: e for m, e in good.items() if m != "job-0007"}) == \
        "machine job-0007: missing from the log"

    finished = next(r for r in log.machines() if r.state == "finished")
    log.append([NewEvent(finished.machine_id, "job", 1, finished.version + 1, "start", "finished",
                         "running", False, finished.updated_us + 1, "someone")])
    problems = check_log(log, demo_charts())
    assert len(problems) == 1 and "is not legal from finished" in problems[0]


def test_fedlog_demo_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = str(tmp_path / "demo.db")
    assert main(["demo", "--db", db, "--machines", "40", "--kills", "2", "--seed", "5"]) == 0
    out = capsys.readouterr().out
    assert f"log: {db}" in out
    assert "identical" in out and "DIFFERENT" not in out
    assert "recovered" in out and "SIGKILL" in out and "finished at tick" in out
    # the demo wants a fresh log
    assert main(["demo", "--db", db, "--machines", "40"]) == 2
    assert "already holds" in capsys.readouterr().err


def test_fedlog_demo_reports_a_difference_and_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def skewed(plan: Plan) -> MemoryRecorder:
        # the "uncrashed run" misses one planned trigger: the verdict must catch it
        dropped = next(a for a in plan.actions if a.trigger == "deploy")
        return reference_log(dataclasses.replace(plan, actions=tuple(a for a in plan.actions if a != dropped)))

    monkeypatch.setattr(report, "reference_log", skewed)
    assert main(["demo", "--db", str(tmp_path / "demo.db"), "--machines", "20", "--kills", "1"]) == 1
    out = capsys.readouterr().out
    assert "DIFFERENT from the uncrashed run: machine job-" in out
