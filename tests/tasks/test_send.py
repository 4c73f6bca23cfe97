"""send: ANY (first asker takes it) and SEQUENTIAL (one slot per task_assignment_timeout)."""

from __future__ import annotations

import asyncio

import pytest

from engine.charts.registry import ChartRegistry
from engine.clock import ManualClock
from engine.tasks import SendOrder, Task, TaskCompletionStatus, TaskError
from tests.tasks.support import harness

ANY, SEQUENTIAL = SendOrder.ANY, SendOrder.SEQUENTIAL


def test_any_goes_to_the_first_asker_and_its_result_completes(
        target: str, charts: ChartRegistry, clock: ManualClock) -> None:
    async def main() -> None:
        async with harness(target, charts, clock) as h:
            await h.connect("a", "b", "c")
            tid = await h.manager.send(Task("eval"), targets=["a", "b", "c", "b"], send_order=ANY)
            b = await h.take("b")
            assert b.client_task_id == f"{tid}/b"
            assert await h.manager.process_task_request("a") is None
            assert (await h.take("b")).resend
            assert h.state(f"{tid}/a") == "cancelled" and h.state(f"{tid}/c") == "cancelled"
            assert await h.answer("b", b, {"acc": 0.9}) == "accepted"
            outcome = await h.manager.wait(tid)
            assert outcome.status is TaskCompletionStatus.OK and outcome.reason == "first_result"
            assert outcome.result == {"acc": 0.9} and [r.site for r in outcome.results] == ["b"]

    asyncio.run(main())


def test_sequential_only_the_target_of_the_current_slot_may_take_it(
        target: str, charts: ChartRegistry, clock: ManualClock) -> None:
    async def main() -> None:
        async with harness(target, charts, clock) as h:
            await h.connect("a", "b", "c")
            tid = await h.manager.send(Task("t"), targets=["a", "b", "c"], task_assignment_timeout=10)
            assert await h.manager.process_task_request("b") is None
            await h.tick(9.999999)
            assert await h.manager.process_task_request("b") is None
            await h.tick(0.000001)  # a's slot is over: b's opens
            await h.connect("a", "b", "c")
            assert h.state(f"{tid}/a") == "timed_out"
            assert await h.manager.process_task_request("a") is None
            assert await h.manager.process_task_request("c") is None
            b = await h.take("b")
            await h.tick(30)  # once taken, the send waits for that site only
            await h.connect("a", "b", "c")
            assert await h.manager.process_task_request("c") is None
            await h.answer("b", b, "done")
            outcome = await h.manager.wait(tid)
            assert outcome.status is TaskCompletionStatus.OK and outcome.result == "done"
            assert h.triggers(tid) == ["create", "send", "advance", "complete"]
            assert h.events(tid, "advance") == [
                {"index": 1, "reason": "assignment_timeout", "window_start_us": clock.now_us() - 30_000_000}]

    asyncio.run(main())


def test_sequential_slot_is_by_elapsed_time_even_before_a_timer_fires(
        target: str, charts: ChartRegistry, clock: ManualClock) -> None:
    async def main() -> None:
        async with harness(target, charts, clock) as h:
            await h.connect("a", "b", "c")
            tid = await h.manager.send(Task("t"), targets=["a", "b", "c"], task_assignment_timeout=10)
            clock.advance(25)  # no timer run: slot 2 (c) is open by the clock
            await h.connect("a", "b", "c")
            assert await h.manager.process_task_request("b") is None
            c = await h.take("c")
            assert c.client_task_id == f"{tid}/c"
            assert h.state(f"{tid}/a") == "timed_out"
            assert h.triggers(f"{tid}/a") == ["create", "timeout"]
            # b's slot passed while nobody looked: its share was never opened
            assert h.recorder.get_machine(f"{tid}/b") is None
            assert h.events(tid, "advance")[0]["index"] == 2

    asyncio.run(main())


def test_sequential_past_the_last_target_is_timeout(target: str, charts: ChartRegistry, clock: ManualClock) -> None:
    async def main() -> None:
        async with harness(target, charts, clock) as h:
            await h.connect("a", "b")
            tid = await h.manager.send(Task("t"), targets=["a", "b"], task_assignment_timeout=5)
            await h.tick(5)
            await h.tick(5)
            outcome = await h.manager.wait(tid)
            assert outcome.status is TaskCompletionStatus.TIMEOUT and outcome.reason == "no_target_took_it"
            assert outcome.results == ()
            assert [h.state(f"{tid}/{s}") for s in "ab"] == ["timed_out", "timed_out"]

    asyncio.run(main())


def test_sequential_without_assignment_timeout_waits_for_the_first_target(
        target: str, charts: ChartRegistry, clock: ManualClock) -> None:
    async def main() -> None:
        async with harness(target, charts, clock) as h:
            await h.connect("a", "b")
            tid = await h.manager.send(Task("t"), targets=["a", "b"])
            for _ in range(5):
                await h.tick(50)
                await h.connect("a", "b")
                assert await h.manager.process_task_request("b") is None
            await h.answer("a", await h.take("a"), 1)
            assert (await h.manager.wait(tid)).status is TaskCompletionStatus.OK

    asyncio.run(main())


@pytest.mark.parametrize("order", [ANY, SEQUENTIAL])
def test_send_needs_targets(target: str, charts: ChartRegistry, clock: ManualClock, order: SendOrder) -> None:
    async def main() -> None:
        async with harness(target, charts, clock) as h:
            with pytest.raises(TaskError) as empty:
                await h.manager.send(Task("t"), targets=[], send_order=order)
            assert empty.value.argument == "targets" and "empty" in str(empty.value)
            with pytest.raises(TaskError) as none:
                await h.manager.send(Task("t"), send_order=order)
            assert none.value.argument == "targets" and "no site is registered" in str(none.value)
            assert h.recorder.last_seq() == 0

    asyncio.run(main())


def test_targets_none_means_the_sites_known_when_scheduled(
        target: str, charts: ChartRegistry, clock: ManualClock) -> None:
    async def main() -> None:
        async with harness(target, charts, clock) as h:
            await h.manager.register_site("b")
            await h.connect("a")
            tid = await h.manager.send(Task("t"), send_order=ANY)
            await h.connect("late")
            assert h.events(tid, "send")[0]["targets"] == ["a", "b"]
            assert await h.manager.process_task_request("late") is None
            assert (await h.take("b")).task_id == tid

    asyncio.run(main())
