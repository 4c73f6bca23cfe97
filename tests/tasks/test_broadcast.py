"""Broadcast completion rules: all targets, min_responses + wait, timeout, and re-sends."""

from __future__ import annotations

import asyncio

from engine.charts.registry import ChartRegistry
from engine.clock import ManualClock
from engine.tasks import SubmissionOutcome, Task, TaskCompletionStatus
from tests.tasks.support import harness

OK = TaskCompletionStatus.OK


def test_completes_when_every_target_answered(target: str, charts: ChartRegistry, clock: ManualClock) -> None:
    async def main() -> None:
        async with harness(target, charts, clock) as h:
            await h.connect("a", "b", "c")
            tid = await h.manager.broadcast(Task("train", data={"w": [1, 2]}), targets=["c", "a", "b", "a"])
            assert h.manager.get_num_standing_tasks() == 1
            got = {s: await h.take(s) for s in ("a", "b", "c")}
            assert got["a"].data == {"w": [1, 2]} and not got["a"].resend and got["a"].send_count == 1
            for site in ("b", "a"):
                assert await h.answer(site, got[site], {"n": site}) == "accepted"
                assert h.state(tid) == "standing"
            assert await h.answer("c", got["c"], {"n": "c"}) == "accepted"
            outcome = await h.manager.wait(tid)
            assert outcome.status is OK and outcome.reason == "all_answered"
            # target order (duplicates dropped), never arrival order
            assert [r.site for r in outcome.results] == ["c", "a", "b"]
            assert outcome.by_site() == {"a": {"n": "a"}, "b": {"n": "b"}, "c": {"n": "c"}}
            assert h.state(tid) == "completed" and h.manager.get_num_standing_tasks() == 0
            assert h.triggers(tid) == ["create", "broadcast", "complete"]
            assert h.events(tid, "broadcast")[0]["targets"] == ["c", "a", "b"]

    asyncio.run(main())


def test_min_responses_zero_means_every_target_not_only_those_sent_the_task(
        target: str, charts: ChartRegistry, clock: ManualClock) -> None:
    async def main() -> None:
        async with harness(target, charts, clock) as h:
            await h.connect("a", "b", "c")
            tid = await h.manager.broadcast(Task("t"), targets=["a", "b", "c"], min_responses=0)
            a, b = await h.take("a"), await h.take("b")
            await h.answer("a", a, 1)
            await h.answer("b", b, 2)
            # every site that was sent the task answered, but c never asked: still standing
            assert h.state(tid) == "standing"
            await h.answer("c", await h.take("c"), 3)
            assert (await h.manager.wait(tid)).status is OK

    asyncio.run(main())


def test_min_responses_then_wait_then_complete(target: str, charts: ChartRegistry, clock: ManualClock) -> None:
    async def main() -> None:
        async with harness(target, charts, clock) as h:
            await h.connect("a", "b", "c")
            tid = await h.manager.broadcast(Task("t", timeout=100), targets=["a", "b", "c"], min_responses=2,
                                            wait_time_after_min_received=10)
            a, b, c = await h.take("a"), await h.take("b"), await h.take("c")
            await h.tick(1)
            await h.answer("a", a, 1)
            await h.answer("b", b, 2)
            assert h.state(tid) == "min_received"
            await h.tick(9.999999)
            assert h.state(tid) == "min_received"
            await h.tick(0.000001)  # exactly the wait: it has elapsed
            outcome = await h.manager.wait(tid)
            assert outcome.status is OK and outcome.reason == "wait_elapsed"
            assert [r.site for r in outcome.results] == ["a", "b"]
            assert h.triggers(tid) == ["create", "broadcast", "min_reached", "wait_elapsed"]
            # c's share ended with the task; its late result is answered, not recorded
            assert h.state(c.client_task_id) == "cancelled"
            assert await h.answer("c", c, 3) == "late"
            assert h.triggers(tid)[-1] == "wait_elapsed"

    asyncio.run(main())


def test_all_answered_ends_the_wait_at_once(target: str, charts: ChartRegistry, clock: ManualClock) -> None:
    async def main() -> None:
        async with harness(target, charts, clock) as h:
            await h.connect("a", "b")
            tid = await h.manager.broadcast(Task("t"), targets=["a", "b"], min_responses=1,
                                            wait_time_after_min_received=60)
            a, b = await h.take("a"), await h.take("b")
            await h.answer("a", a, 1)
            assert h.state(tid) == "min_received"
            await h.answer("b", b, 2)
            outcome = await h.manager.wait(tid)
            assert outcome.status is OK and outcome.reason == "all_answered" and len(outcome.results) == 2
            assert h.triggers(tid) == ["create", "broadcast", "min_reached", "complete"]

    asyncio.run(main())


def test_no_wait_completes_on_min_responses(target: str, charts: ChartRegistry, clock: ManualClock) -> None:
    async def main() -> None:
        async with harness(target, charts, clock) as h:
            await h.connect("a", "b", "c")
            tid = await h.manager.broadcast(Task("t"), targets=["a", "b", "c"], min_responses=1)
            await h.answer("b", await h.take("b"), "x")
            outcome = await h.manager.wait(tid)
            assert outcome.status is OK and outcome.reason == "min_responses"
            assert [r.result for r in outcome.results] == ["x"]
            assert h.state(f"{tid}/a") == "cancelled" and h.state(f"{tid}/c") == "cancelled"

    asyncio.run(main())


def test_timeout_exactly_elapsed_is_timeout(target: str, charts: ChartRegistry, clock: ManualClock) -> None:
    async def main() -> None:
        async with harness(target, charts, clock) as h:
            await h.connect("a", "b")
            tid = await h.manager.broadcast(Task("t", timeout=30), targets=["a", "b"])
            a = await h.take("a")
            await h.answer("a", a, 1)
            await h.tick(29.999999)
            assert h.state(tid) == "standing"
            clock.advance(0.000001)
            # a result that arrives exactly at the deadline is late, even before the timer fired
            b = await h.manager.process_task_request("b")
            assert b is None
            outcome = await h.manager.wait(tid)
            assert outcome.status is TaskCompletionStatus.TIMEOUT
            assert [r.site for r in outcome.results] == ["a"]
            assert h.state(f"{tid}/b") == "timed_out" and h.state(f"{tid}/a") == "result_received"

    asyncio.run(main())


def test_task_deadline_before_the_wait_ends_it_timeout(
        target: str, charts: ChartRegistry, clock: ManualClock) -> None:
    async def main() -> None:
        async with harness(target, charts, clock) as h:
            await h.connect("a", "b")
            tid = await h.manager.broadcast(Task("t", timeout=20), targets=["a", "b"], min_responses=1,
                                            wait_time_after_min_received=60)
            await h.tick(5)
            await h.answer("a", await h.take("a"), 1)
            assert h.state(tid) == "min_received"
            await h.tick(14.999999)
            assert h.state(tid) == "min_received"
            await h.tick(0.000001)  # the task's own deadline, while the engine's timer is the wait
            outcome = await h.manager.wait(tid)
            assert outcome.status is TaskCompletionStatus.TIMEOUT and len(outcome.results) == 1
            assert h.triggers(tid) == ["create", "broadcast", "min_reached", "timeout"]

    asyncio.run(main())


def test_wait_ending_with_the_deadline_completes(target: str, charts: ChartRegistry, clock: ManualClock) -> None:
    async def main() -> None:
        async with harness(target, charts, clock) as h:
            await h.connect("a", "b")
            tid = await h.manager.broadcast(Task("t", timeout=20), targets=["a", "b"], min_responses=1,
                                            wait_time_after_min_received=10)
            await h.tick(10)
            await h.answer("a", await h.take("a"), 1)
            await h.tick(10)  # wait and timeout pass together: the exit rule is checked first
            assert (await h.manager.wait(tid)).status is OK

    asyncio.run(main())


def test_a_resend_is_never_a_new_dispatch(backend_url: str, charts: ChartRegistry, clock: ManualClock) -> None:
    """The reference's defect: two sites, min_responses=2, a re-send must not count twice."""

    async def main() -> None:
        async with harness(backend_url, charts, clock) as h:
            await h.connect("a", "b")
            tid = await h.manager.broadcast(Task("round"), targets=["a", "b"], min_responses=2)
            # a later standing task that does not apply to a
            other = await h.manager.broadcast(Task("other"), targets=["b"])
            first = await h.take("a")
            again = await h.take("a")
            third = await h.take("a")
            assert (again.client_task_id, again.resend, again.send_count) == (first.client_task_id, True, 2)
            assert third.send_count == 3
            assert await h.answer("a", third, "r") == "accepted"
            assert h.state(tid) == "standing"  # one result of two
            assert await h.answer("a", first, "r") == "duplicate"
            assert h.state(tid) == "standing"
            b = await h.take("b")
            assert b.task_id == tid  # schedule order: the round first
            assert await h.answer("b", b, "s") == "accepted"
            outcome = await h.manager.wait(tid)
            assert outcome.status is OK and [r.site for r in outcome.results] == ["a", "b"]
            share = first.client_task_id
            assert h.triggers(share) == ["create", "send", "resend", "resend", "result"]
            assert h.events(tid, "drop_result") == [
                {"site": "a", "reason": "duplicate", "client_task_id": share}]
            assert (await h.take("b")).task_id == other

    asyncio.run(main())


def test_before_task_sent_runs_on_every_send_and_may_change_the_data(
        target: str, charts: ChartRegistry, clock: ManualClock) -> None:
    seen: list[tuple[str, int]] = []

    def before(view):  # type: ignore[no-untyped-def]
        seen.append((view.site, view.send_count))
        view.data = {"for": view.site, "base": view.data}

    async def main() -> None:
        async with harness(target, charts, clock) as h:
            await h.connect("a", "b")
            task = Task("t", data=[1], before_task_sent_cb=before)
            tid = await h.manager.broadcast(task, targets=["a", "b"])
            a = await h.take("a")
            assert a.data == {"for": "a", "base": [1]}
            again = await h.take("a")
            # the same assignment again; the callback ran again on what was sent
            assert again.resend and again.data == {"for": "a", "base": {"for": "a", "base": [1]}}
            assert seen == [("a", 0), ("a", 1)]
            assert h.events(a.client_task_id, "send") == [{"data": {"for": "a", "base": [1]}}]
            assert task.data == [1] and h.events(tid, "broadcast")[0]["data"] == [1]

    asyncio.run(main())


def test_result_callback_may_replace_the_result(target: str, charts: ChartRegistry, clock: ManualClock) -> None:
    done: list[TaskCompletionStatus | None] = []

    def received(view):  # type: ignore[no-untyped-def]
        view.result = {"site": view.site, "value": view.result * 10}

    async def task_done(task: Task) -> None:
        done.append(task.completion_status)

    async def main() -> None:
        async with harness(target, charts, clock) as h:
            await h.connect("a")
            task = Task("t", result_received_cb=received, task_done_cb=task_done)
            tid = await h.manager.broadcast(task, targets=["a"])
            a = await h.take("a")
            await h.answer("a", a, 4)
            outcome = await h.manager.wait(tid)
            assert outcome.result == {"site": "a", "value": 40}
            assert h.events(a.client_task_id, "result") == [{"result": {"site": "a", "value": 40}}]
            assert done == [OK] and task.outcome == outcome and task.task_id == tid

    asyncio.run(main())


def test_a_raising_result_callback_ends_the_task_error(
        target: str, charts: ChartRegistry, clock: ManualClock) -> None:
    def received(view):  # type: ignore[no-untyped-def]
        raise RuntimeError("bad aggregation")

    async def main() -> None:
        async with harness(target, charts, clock) as h:
            await h.connect("a", "b")
            tid = await h.manager.broadcast(Task("t", result_received_cb=received), targets=["a", "b"])
            a = await h.take("a")
            assert await h.answer("a", a, 1) == SubmissionOutcome.ACCEPTED.value
            outcome = await h.manager.wait(tid)
            assert outcome.status is TaskCompletionStatus.ERROR and "bad aggregation" in (outcome.reason or "")
            assert h.state(tid) == "errored" and h.state(f"{tid}/b") == "cancelled"

    asyncio.run(main())


def test_broadcast_forever_hands_out_new_rounds_and_never_completes(
        target: str, charts: ChartRegistry, clock: ManualClock) -> None:
    async def main() -> None:
        async with harness(target, charts, clock) as h:
            await h.connect("a", "b")
            tid = await h.manager.broadcast_forever(Task("status"), targets=["a", "b"])
            a0 = await h.take("a")
            assert await h.answer("a", a0, 1) == "accepted"
            a1 = await h.take("a")
            assert a1.client_task_id == f"{tid}/a/1" and not a1.resend and a1.hop == 1
            await h.answer("a", a1, 2)
            await h.answer("b", await h.take("b"), 3)
            for _ in range(10):  # sites that keep in touch: the task stands on and on
                await h.tick(50)
                await h.connect("a", "b")
            assert h.state(tid) == "standing"
            a2 = await h.take("a")
            assert await h.manager.cancel_task(tid)
            outcome = await h.manager.wait(tid)
            assert outcome.status is TaskCompletionStatus.CANCELLED
            assert [(r.site, r.result) for r in outcome.results] == [("a", 1), ("a", 2), ("b", 3)]
            assert h.state(a2.client_task_id) == "cancelled"  # the round a had not answered yet
            assert await h.answer("a", a2, 4) == "late"

    asyncio.run(main())
