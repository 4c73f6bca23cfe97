"""Scheduling arguments are checked before anything is written; a replay re-attaches by id."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from engine.charts.registry import ChartRegistry
from engine.clock import ManualClock
from engine.errors import NondeterminismError
from engine.tasks import Task, TaskCompletionStatus, TaskError
from tests.tasks.support import harness


@pytest.mark.parametrize(("kwargs", "argument"), [
    ({"targets": "a"}, "targets"),
    ({"targets": ["A b"]}, "targets"),
    ({"targets": ["a", 3]}, "targets"),
    ({"min_responses": -1}, "min_responses"),
    ({"min_responses": 1.5}, "min_responses"),
    ({"wait_time_after_min_received": -2}, "wait_time_after_min_received"),
    ({"method": "gossip"}, "method"),
    ({"method": "send", "send_order": "random"}, "send_order"),
    ({"method": "send", "task_assignment_timeout": float("nan")}, "task_assignment_timeout"),
    ({"method": "send", "forever": True}, "forever"),
    ({"method": "relay", "dynamic_targets": "yes"}, "dynamic_targets"),
    ({"task_id": "a/b"}, "task_id"),
])
def test_bad_arguments_are_named_and_write_nothing(
        charts: ChartRegistry, clock: ManualClock, kwargs: dict[str, Any], argument: str) -> None:
    async def main() -> None:
        async with harness("memory", charts, clock) as h:
            await h.connect("a")
            seq = h.recorder.last_seq()
            with pytest.raises(TaskError) as err:
                await h.manager.schedule(Task("t"), **{"targets": ["a"], **kwargs})
            assert err.value.argument == argument and str(err.value).startswith(f"{argument}: ")
            assert h.recorder.last_seq() == seq

    asyncio.run(main())


def test_task_fields_are_checked() -> None:
    with pytest.raises(TaskError) as name:
        Task("")
    assert name.value.argument == "task.name"
    with pytest.raises(TaskError) as timeout:
        Task("t", timeout=-1)
    assert timeout.value.argument == "task.timeout"
    with pytest.raises(TaskError) as cb:
        Task("t", task_done_cb="not callable")  # type: ignore[arg-type]
    assert cb.value.argument == "task.task_done_cb"


def test_data_must_be_json_and_a_task_is_scheduled_once(charts: ChartRegistry, clock: ManualClock) -> None:
    async def main() -> None:
        async with harness("memory", charts, clock) as h:
            await h.connect("a")
            with pytest.raises(TaskError) as data:
                await h.manager.broadcast(Task("t", data={1: "int key"}), targets=["a"])
            assert data.value.argument == "task.data"
            task = Task("t")
            await h.manager.broadcast(task, targets=["a"])
            with pytest.raises(TaskError) as again:
                await h.manager.broadcast(task, targets=["a"])
            assert again.value.argument == "task" and "job.t1" in str(again.value)

    asyncio.run(main())


def test_a_replayed_schedule_reattaches_and_a_different_one_is_nondeterminism(
        sqlite_path: str, charts: ChartRegistry, clock: ManualClock) -> None:
    done: list[str] = []

    async def main() -> None:
        async with harness(sqlite_path, charts, clock) as h:
            await h.connect("a", "b")
            tid = await h.manager.broadcast(Task("t", data=[1]), targets=["a", "b"], task_id="r1.train")
            await h.answer("a", await h.take("a"), 1)
            await h.answer("b", await h.take("b"), 2)
            await h.manager.wait(tid)
        async with harness(sqlite_path, charts, clock) as h2:
            await h2.manager.recover()
            again = Task("t", data=[1], task_done_cb=lambda t: done.append(t.completion_status))
            assert await h2.manager.broadcast(again, targets=["a", "b"], task_id="r1.train") == tid
            assert done == [TaskCompletionStatus.OK] and again.outcome is not None
            assert [r.result for r in again.outcome.results] == [1, 2]
            with pytest.raises(NondeterminismError) as err:
                await h2.manager.broadcast(Task("t", data=[2]), targets=["a", "b"], task_id="r1.train")
            assert "data: recorded [1], now [2]" in str(err.value) and "r1.train" in err.value.call

    asyncio.run(main())


def test_default_ids_count_per_job(charts: ChartRegistry, clock: ManualClock) -> None:
    async def main() -> None:
        async with harness("memory", charts, clock) as h:
            await h.connect("a")
            ids = [await h.manager.broadcast(Task("t"), targets=["a"]) for _ in range(2)]
            ids.append(await h.manager.broadcast(Task("t"), targets=["a"], job_id="other", round=3))
            assert ids == ["job.t1", "job.t2", "other.t1"]
            row = h.recorder.get_machine("other.t1")
            assert row is not None and (row.job_id, row.round) == ("other", 3)
            share = h.recorder.get_machine("other.t1/a")
            assert share is not None and (share.job_id, share.round, share.site) == ("other", 3, "a")
            assert h.manager.get_num_standing_tasks("other") == 1
            assert h.manager.standing_task_ids() == ids

    asyncio.run(main())
