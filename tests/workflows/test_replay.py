"""Replay after a restart: recorded values, divergence, the silent logger, checkpoints, the run's end."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import pytest

from engine.charts.registry import ChartRegistry
from engine.clock import ManualClock
from engine.errors import EngineError, NondeterminismError, TaskError
from engine.tasks import Task, TaskCompletionStatus
from engine.workflows import Controller, WorkflowRunner, fedavg, weighted_mean
from engine.workflows.controller import USER_LOGGER
from tests.tasks.support import harness
from tests.workflows.support import SITES, records, serve

US = 1_000_000
#: flipped between the two runs of a test to make a workflow behave differently on replay
BRANCH = True
DATA = 1


def crash_then_recover(path: str, charts: ChartRegistry, clock: ManualClock, workflow: Callable[..., Any], *,
                       stop_after: int, args: dict[str, Any] | None = None, sites: tuple[str, ...] = ("a",),
                       between: Callable[[], None] | None = None,
                       check: Callable[[Any, WorkflowRunner], None] | None = None) -> Any:
    """Run ``workflow`` until ``stop_after`` results, close everything, reopen, recover and finish it."""

    async def before() -> None:
        async with harness(path, charts, clock) as h:
            await h.connect(*sites)
            runner = WorkflowRunner(h.manager, workflow, job_id="j", args=args)
            await runner.start()
            await serve(runner, h.manager, sites, stop_after=stop_after)
            assert not runner.done()
            await runner.close()

    asyncio.run(before())
    if between is not None:
        between()

    async def after() -> Any:
        async with harness(path, charts, clock) as h:
            runner = WorkflowRunner(h.manager, workflow, job_id="j", args=args)
            await runner.recover_and_start()
            await serve(runner, h.manager, sites)
            try:
                return await runner.result()
            finally:
                if check is not None:
                    check(h, runner)

    return asyncio.run(after())


def branching(ctl: Controller) -> str:
    ctl.broadcast_and_wait(Task("first", data=DATA), targets=["a"])
    if BRANCH:
        ctl.now()
    else:
        ctl.publish("x", round=0)
    ctl.broadcast_and_wait(Task("second"), targets=["a"])
    return "done"


def test_a_workflow_that_branches_differently_on_replay_raises_naming_the_call(
        sqlite_path: str, charts: ChartRegistry, clock: ManualClock, monkeypatch: pytest.MonkeyPatch) -> None:
    def check(h: Any, runner: WorkflowRunner) -> None:
        assert h.state("j.workflow") == "running"  # nothing recorded: a corrected workflow can recover

    with pytest.raises(NondeterminismError) as err:
        crash_then_recover(sqlite_path, charts, clock, branching, stop_after=1,
                           between=lambda: monkeypatch.setattr(__name__ + ".BRANCH", False), check=check)
    assert err.value.call == "call 2 publish('x', round=0)"
    assert err.value.recorded.startswith("event seq ") and err.value.recorded.endswith(": now (call 2)")


def test_a_task_scheduled_with_other_arguments_on_replay_raises(
        sqlite_path: str, charts: ChartRegistry, clock: ManualClock, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(NondeterminismError) as err:
        crash_then_recover(sqlite_path, charts, clock, branching, stop_after=1,
                           between=lambda: monkeypatch.setattr(__name__ + ".DATA", 5))
    assert err.value.call == "call 1 broadcast_and_wait('first', targets=['a'])"
    assert "broadcast of task 'j.t1'" in err.value.recorded and "data: recorded 1, now 5" in err.value.recorded


def test_a_task_where_the_log_recorded_a_value_raises(
        sqlite_path: str, charts: ChartRegistry, clock: ManualClock, monkeypatch: pytest.MonkeyPatch) -> None:
    def values_first(ctl: Controller) -> None:
        if BRANCH:
            ctl.now()
        ctl.broadcast_and_wait(Task("t"), targets=["a"])

    with pytest.raises(NondeterminismError) as err:
        crash_then_recover(sqlite_path, charts, clock, values_first, stop_after=0,
                           between=lambda: monkeypatch.setattr(__name__ + ".BRANCH", False))
    assert err.value.call == "call 1 broadcast_and_wait('t', targets=['a'])"
    assert err.value.recorded.endswith(": now (call 1)")


def test_returning_before_the_recorded_calls_are_used_up_raises(
        sqlite_path: str, charts: ChartRegistry, clock: ManualClock, monkeypatch: pytest.MonkeyPatch) -> None:
    def short(ctl: Controller) -> None:
        ctl.now()
        if BRANCH:
            ctl.broadcast_and_wait(Task("t"), targets=["a"])

    with pytest.raises(NondeterminismError) as err:
        crash_then_recover(sqlite_path, charts, clock, short, stop_after=0,
                           between=lambda: monkeypatch.setattr(__name__ + ".BRANCH", False))
    assert err.value.call == "return after call 1"
    assert "broadcast of task 'j.t2'" in err.value.recorded


def timed(ctl: Controller) -> list[int]:
    t0 = ctl.now()
    ctl.broadcast_and_wait(Task("t"), targets=["a"])
    return [t0, ctl.now()]


def test_now_returns_the_recorded_time_on_replay(sqlite_path: str, charts: ChartRegistry) -> None:
    clock = ManualClock()
    start = clock.now_us()
    result = crash_then_recover(sqlite_path, charts, clock, timed, stop_after=0,
                                between=lambda: clock.advance(100))
    assert result == [start, start + 100 * US]


def chatty(ctl: Controller) -> int:
    for r in range(3):
        ctl.logger.info("round %d", r)
        ctl.broadcast_and_wait(Task("t", data=r), targets=["a"])
    ctl.logger.info("done")
    return ctl.calls


def test_the_logger_is_silent_while_replaying(sqlite_path: str, charts: ChartRegistry, clock: ManualClock,
                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=USER_LOGGER)
    messages: list[list[str]] = []

    def between() -> None:
        messages.append([r.getMessage() for r in caplog.records if r.name == USER_LOGGER])
        caplog.clear()

    def check(h: Any, runner: WorkflowRunner) -> None:
        assert runner.ctl is not None and runner.ctl.replayed_calls == 2

    assert crash_then_recover(sqlite_path, charts, clock, chatty, stop_after=1, between=between, check=check) == 3
    assert messages == [["round 0", "round 1"]]
    # rounds 0 and 1 were replayed silently; round 1's task was re-attached, round 2 ran live
    assert [r.getMessage() for r in caplog.records if r.name == USER_LOGGER] == ["round 2", "done"]
    assert all(getattr(r, "job_id", None) == "j" for r in caplog.records if r.name == USER_LOGGER)


def averaging_from_the_top(ctl: Controller, model: dict[str, Any], rounds: int) -> dict[str, Any]:
    """FedAvg that checkpoints but never resumes from a checkpoint: replayed from call 1."""
    for r in range(rounds):
        outcome = ctl.broadcast_and_wait(Task("train", data={"round": r, "model": model}))
        model, sites, total = weighted_mean(outcome, model)
        ctl.publish({"model": model, "sites": sites, "n": total}, round=r)
        ctl.checkpoint({"round": r + 1, "model": model})
    return model


@pytest.mark.parametrize(("workflow", "replayed"), [(fedavg, 1), (averaging_from_the_top, 10)])
def test_a_checkpoint_bounds_replay(sqlite_path: str, charts: ChartRegistry, clock: ManualClock,
                                    workflow: Callable[..., Any], replayed: int) -> None:
    def check(h: Any, runner: WorkflowRunner) -> None:
        assert runner.ctl is not None and runner.ctl.replayed_calls == replayed
        assert runner.ctl.calls == 15

    # 5 rounds of 3 calls; the server stops in round 3 (a and b answered, c holds its task)
    result = crash_then_recover(sqlite_path, charts, clock, workflow, stop_after=3 * 3 + 2, sites=SITES,
                                args={"model": {"v": 0.0}, "rounds": 5}, check=check)
    assert result == {"v": 5 * 2.75}


def test_random_draws_the_same_numbers_when_resumed_at_a_checkpoint(sqlite_path: str, charts: ChartRegistry,
                                                                    clock: ManualClock) -> None:
    def draws(ctl: Controller) -> list[float]:
        state = ctl.resume_point() or {"drawn": [], "round": 0}
        for r in range(state["round"], 3):
            ctl.broadcast_and_wait(Task("t", data=r), targets=["a"])
            state = {"drawn": [*state["drawn"], ctl.random().random()], "round": r + 1}
            ctl.checkpoint(state)
        return list(state["drawn"])

    async def uninterrupted() -> Any:
        async with harness("memory", charts, ManualClock()) as h:
            await h.connect("a")
            runner = WorkflowRunner(h.manager, draws, job_id="j")
            await runner.start()
            await serve(runner, h.manager, ["a"])
            return await runner.result()

    expected = asyncio.run(uninterrupted())
    assert len(set(expected)) == 3
    assert crash_then_recover(sqlite_path, charts, clock, draws, stop_after=2) == expected


def test_handles_wait_cancel_and_standing_counts_replay_the_same(sqlite_path: str, charts: ChartRegistry,
                                                                clock: ManualClock) -> None:
    def handles(ctl: Controller) -> list[Any]:
        one = ctl.broadcast(Task("one"), targets=["a"])
        two = ctl.send(Task("two"), targets=["a"])
        standing = ctl.get_num_standing_tasks()
        ctl.cancel_task(two)
        first = ctl.wait(one)
        second = ctl.wait(two)
        return [standing, first.status.value, second.status.value, ctl.get_num_standing_tasks()]

    def check(h: Any, runner: WorkflowRunner) -> None:
        assert [(r["call"], r["op"], r["value"]) for r in records(h.recorder, "j")] == [
            (3, "standing", 2), (4, "standing", 0)]

    # the first run stops while the workflow waits on "one" (its site took it, no answer)
    assert crash_then_recover(sqlite_path, charts, clock, handles, stop_after=0, check=check) == [
        2, "ok", "cancelled", 0]


def test_a_failing_workflow_records_the_error(sqlite_path: str, charts: ChartRegistry, clock: ManualClock) -> None:
    def failing(ctl: Controller) -> None:
        ctl.now()
        raise TaskError("rounds", "no rounds left")

    async def main() -> None:
        async with harness(sqlite_path, charts, clock) as h:
            runner = WorkflowRunner(h.manager, failing, job_id="j")
            await runner.start()
            with pytest.raises(TaskError, match="no rounds left"):
                await runner.result()
            assert h.state("j.workflow") == "failed"
            assert h.events("j.workflow", "fail") == [{"error": "TaskError: rounds: no rounds left"}]
        async with harness(sqlite_path, charts, clock) as h:
            again = WorkflowRunner(h.manager, failing, job_id="j")
            await again.recover_and_start()
            with pytest.raises(EngineError, match="failed: TaskError: rounds: no rounds left"):
                await again.result()

    asyncio.run(main())


def test_a_finished_workflow_is_not_run_again(sqlite_path: str, charts: ChartRegistry, clock: ManualClock) -> None:
    runs: list[int] = []

    def once(ctl: Controller) -> dict[str, Any]:
        runs.append(ctl.now())
        return {"t": runs[-1]}

    async def main() -> None:
        async with harness(sqlite_path, charts, clock) as h:
            runner = WorkflowRunner(h.manager, once, job_id="j")
            await runner.start()
            first = await runner.result()
        clock.advance(10)
        async with harness(sqlite_path, charts, clock) as h:
            again = WorkflowRunner(h.manager, once, job_id="j")
            await again.recover_and_start()
            assert await again.result() == first
            assert await again.next_wait(0) is None

    asyncio.run(main())
    assert len(runs) == 1


def test_abort_ends_the_standing_task_and_the_run(target: str, charts: ChartRegistry, clock: ManualClock) -> None:
    def long(ctl: Controller) -> None:
        outcome = ctl.broadcast_and_wait(Task("t"), targets=["a"])
        assert outcome.status is TaskCompletionStatus.ABORTED
        ctl.now()  # raises: the run was aborted

    async def main() -> None:
        async with harness(target, charts, clock) as h:
            await h.connect("a")
            runner = WorkflowRunner(h.manager, long, job_id="j")
            await runner.start()
            assert await runner.next_wait(0) == 1
            await runner.abort("admin said so")
            with pytest.raises(EngineError, match="aborted: admin said so"):
                await runner.result()
            assert h.state("j.workflow") == "aborted" and h.state("j.t1") == "aborted"
            assert h.triggers("j.workflow") == ["create", "abort"]

    asyncio.run(main())


def test_bad_handles_and_job_ids_are_refused(charts: ChartRegistry, clock: ManualClock) -> None:
    def waits_on_junk(ctl: Controller) -> None:
        ctl.wait("j.t1")  # type: ignore[arg-type]

    async def main() -> None:
        async with harness("memory", charts, clock) as h:
            with pytest.raises(TaskError, match="job_id"):
                WorkflowRunner(h.manager, waits_on_junk, job_id="a/b")
            runner = WorkflowRunner(h.manager, waits_on_junk, job_id="j")
            await runner.start()
            with pytest.raises(TaskError, match="must be a TaskHandle"):
                await runner.result()

    asyncio.run(main())
