"""Results that cannot be taken are dropped, recorded while the task stands, and never counted."""

from __future__ import annotations

import asyncio

import pytest

from engine.charts.registry import ChartRegistry
from engine.clock import ManualClock
from engine.tasks import SubmissionOutcome, Task, TaskCompletionStatus, TaskError
from tests.tasks.support import harness


def test_wrong_site_duplicate_and_unknown(target: str, charts: ChartRegistry, clock: ManualClock) -> None:
    async def main() -> None:
        async with harness(target, charts, clock) as h:
            await h.connect("a", "b", "c")
            tid = await h.manager.broadcast(Task("t"), targets=["a", "b", "c"])
            a, b = await h.take("a"), await h.take("b")
            # b submits on a's assignment: not counted, recorded
            assert await h.answer("b", a, "forged") == "wrong_site"
            assert await h.answer("a", a, 1) == "accepted"
            assert await h.answer("a", a, 1) == "duplicate"
            m = h.manager
            assert await m.process_submission("a", tid, f"{tid}/nobody", 1) is SubmissionOutcome.UNKNOWN_TASK
            assert await m.process_submission("a", "other", a.client_task_id, 1) is SubmissionOutcome.UNKNOWN_TASK
            assert await m.process_submission("a", "job.t9", "job.t9/a", 1) is SubmissionOutcome.UNKNOWN_TASK
            # c was never sent the task: a result for it cannot come from anyone holding it
            assert await m.process_submission("c", tid, f"{tid}/c", 1) is SubmissionOutcome.UNKNOWN_TASK
            assert h.events(tid, "drop_result") == [
                {"site": "b", "reason": "wrong_site", "client_task_id": a.client_task_id, "owner": "a"},
                {"site": "a", "reason": "duplicate", "client_task_id": a.client_task_id},
            ]
            assert h.state(tid) == "standing"
            await h.answer("b", b, 2)
            await h.answer("c", await h.take("c"), 3)
            outcome = await m.wait(tid)
            assert [r.result for r in outcome.results] == [1, 2, 3]
            # after the task ended: answered from the states, nothing written
            seq = h.recorder.last_seq()
            assert await h.answer("a", a, 1) == "duplicate"
            assert await h.answer("c", a, 1) == "wrong_site"
            assert h.recorder.last_seq() == seq

    asyncio.run(main())


def test_a_result_that_is_not_json_changes_nothing(target: str, charts: ChartRegistry, clock: ManualClock) -> None:
    async def main() -> None:
        async with harness(target, charts, clock) as h:
            await h.connect("a")
            await h.manager.broadcast(Task("t"), targets=["a"])
            a = await h.take("a")
            seq = h.recorder.last_seq()
            with pytest.raises(TaskError) as err:
                await h.answer("a", a, {"x": object()})
            assert err.value.argument == "result"
            assert h.recorder.last_seq() == seq and h.state(a.client_task_id) == "sent"

    asyncio.run(main())


def test_cancel_task_and_cancel_all_run_task_done(target: str, charts: ChartRegistry, clock: ManualClock) -> None:
    done: list[tuple[str | None, TaskCompletionStatus | None]] = []

    def task_done(task: Task) -> None:
        done.append((task.task_id, task.completion_status))

    async def main() -> None:
        async with harness(target, charts, clock) as h:
            await h.connect("a", "b")
            one = Task("one", task_done_cb=task_done)
            t1 = await h.manager.broadcast(one, targets=["a", "b"])
            t2 = await h.manager.send(Task("two", task_done_cb=task_done), targets=["a"])
            t3 = await h.manager.relay(Task("three", task_done_cb=task_done), targets=["b"])
            a = await h.take("a")
            assert a.task_id == t1
            assert await h.manager.cancel_task(one)
            assert not await h.manager.cancel_task(one)  # not standing any more: no effect
            assert done == [(t1, TaskCompletionStatus.CANCELLED)]
            assert h.state(a.client_task_id) == "cancelled" and h.state(f"{t1}/b") == "cancelled"
            assert await h.answer("a", a, 1) == "late"
            assert await h.manager.cancel_all_tasks(TaskCompletionStatus.ABORTED) == 2
            assert done[1:] == [(t2, TaskCompletionStatus.ABORTED), (t3, TaskCompletionStatus.ABORTED)]
            assert [h.state(t) for t in (t1, t2, t3)] == ["cancelled", "aborted", "aborted"]
            assert h.manager.get_num_standing_tasks() == 0
            assert (await h.manager.wait(t2)).status is TaskCompletionStatus.ABORTED

    asyncio.run(main())


def test_abort_signal_while_waiting(target: str, charts: ChartRegistry, clock: ManualClock) -> None:
    async def main() -> None:
        async with harness(target, charts, clock) as h:
            await h.connect("a")
            signal = asyncio.Event()
            waiting = asyncio.create_task(
                h.manager.broadcast_and_wait(Task("t"), targets=["a"], abort_signal=signal))
            while h.manager.get_num_standing_tasks() == 0:
                await asyncio.sleep(0)
            signal.set()
            outcome = await asyncio.wait_for(waiting, 10)
            assert outcome.status is TaskCompletionStatus.ABORTED and outcome.reason == "abort_signal"

    asyncio.run(main())


def test_a_callback_may_cancel_its_own_task(target: str, charts: ChartRegistry, clock: ManualClock) -> None:
    async def main() -> None:
        async with harness(target, charts, clock) as h:
            await h.connect("a")

            async def before(view):  # type: ignore[no-untyped-def]
                await h.manager.cancel_task(view.task_id)

            tid = await h.manager.send(Task("t", before_task_sent_cb=before), targets=["a"])
            assert await h.manager.process_task_request("a") is None
            assert (await h.manager.wait(tid)).status is TaskCompletionStatus.CANCELLED

    asyncio.run(main())


def test_task_check_tells_a_site_whether_to_go_on(target: str, charts: ChartRegistry, clock: ManualClock) -> None:
    async def main() -> None:
        async with harness(target, charts, clock) as h:
            await h.connect("a", "b")
            tid = await h.manager.broadcast(Task("t", timeout=10), targets=["a", "b"])
            a = await h.take("a")
            info = await h.manager.process_task_check("a", a.client_task_id)
            assert info is not None and info.active and (info.state, info.task_state) == ("sent", "standing")
            # another site's assignment, or one that does not exist, is unknown to the asker
            assert await h.manager.process_task_check("b", a.client_task_id) is None
            assert await h.manager.process_task_check("a", f"{tid}/zz") is None
            assert await h.manager.process_task_check("a", "nope/a") is None
            clock.advance(10)  # the deadline passed; the check sees it even before the timer fires
            info = await h.manager.process_task_check("a", a.client_task_id)
            assert info is not None and not info.active
            assert (info.state, info.task_state) == ("timed_out", "timed_out")

    asyncio.run(main())
