"""relay: hops in order, skipping silent hops, data passed along, the last hop completes it."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from engine.charts.registry import ChartRegistry
from engine.clock import ManualClock
from engine.tasks import ClientTaskView, SendOrder, Task, TaskCompletionStatus, TaskError
from tests.tasks.support import harness

OK = TaskCompletionStatus.OK


def _add_one(view: ClientTaskView) -> None:
    # cyclic weight transfer: each hop's result is the next hop's data
    view.next_data = view.result


def test_hops_in_order_each_getting_the_previous_result(
        target: str, charts: ChartRegistry, clock: ManualClock) -> None:
    async def main() -> None:
        async with harness(target, charts, clock) as h:
            await h.connect("a", "b")
            tid = await h.manager.relay(Task("cyclic", data={"w": 0}, result_received_cb=_add_one),
                                        targets=["a", "b", "a"])
            assert await h.manager.process_task_request("b") is None
            hop0 = await h.take("a")
            assert (hop0.client_task_id, hop0.hop, hop0.data) == (f"{tid}/0", 0, {"w": 0})
            assert await h.answer("a", hop0, {"w": 1}) == "accepted"
            assert await h.manager.process_task_request("a") is None
            hop1 = await h.take("b")
            assert (hop1.client_task_id, hop1.data) == (f"{tid}/1", {"w": 1})
            await h.answer("b", hop1, {"w": 2})
            hop2 = await h.take("a")  # a site may take several hops
            assert (hop2.client_task_id, hop2.data) == (f"{tid}/2", {"w": 2})
            assert h.state(tid) == "standing"
            await h.answer("a", hop2, {"w": 3})
            outcome = await h.manager.wait(tid)
            assert outcome.status is OK and outcome.reason == "last_hop" and outcome.result == {"w": 3}
            assert [(r.site, r.hop) for r in outcome.results] == [("a", 0), ("b", 1), ("a", 2)]
            assert [d["data"] for d in h.events(tid, "advance")] == [{"w": 1}, {"w": 2}]

    asyncio.run(main())


def test_a_hop_that_does_not_pick_up_is_skipped(backend_url: str, charts: ChartRegistry, clock: ManualClock) -> None:
    async def main() -> None:
        async with harness(backend_url, charts, clock) as h:
            await h.connect("a", "b", "c")
            tid = await h.manager.relay(Task("t", data=0, result_received_cb=_add_one), targets=["a", "b", "c"],
                                        task_assignment_timeout=10)
            await h.answer("a", await h.take("a"), 1)
            await h.tick(9.999999)
            await h.connect("a", "b", "c")
            assert await h.manager.process_task_request("c") is None
            await h.tick(0.000001)  # b never asked within its 10 s: c is next, with a's result
            assert h.state(f"{tid}/1") == "timed_out"
            assert await h.manager.process_task_request("b") is None
            c = await h.take("c")
            assert (c.client_task_id, c.data) == (f"{tid}/2", 1)
            await h.answer("c", c, 2)
            outcome = await h.manager.wait(tid)
            assert outcome.status is OK and [r.site for r in outcome.results] == ["a", "c"]
            assert [(d["index"], d["reason"]) for d in h.events(tid, "advance")] == [(1, "result"), (2, "skipped")]

    asyncio.run(main())


def test_a_silent_hop_is_skipped_after_the_result_timeout_and_its_result_is_late(
        target: str, charts: ChartRegistry, clock: ManualClock) -> None:
    async def main() -> None:
        async with harness(target, charts, clock) as h:
            await h.connect("a", "b")
            tid = await h.manager.relay(Task("t", data="x"), targets=["a", "b"], task_result_timeout=30)
            a = await h.take("a")
            await h.tick(30)
            await h.connect("a", "b")
            assert h.state(a.client_task_id) == "timed_out"
            b = await h.take("b")
            assert b.data == "x"
            assert await h.answer("a", a, "too late") == "late"
            assert h.events(tid, "drop_result") == [
                {"site": "a", "reason": "late", "client_task_id": a.client_task_id}]
            await h.answer("b", b, "y")
            outcome = await h.manager.wait(tid)
            assert outcome.status is OK and [r.result for r in outcome.results] == ["y"]

    asyncio.run(main())


def test_running_out_of_hops(target: str, charts: ChartRegistry, clock: ManualClock) -> None:
    async def main() -> None:
        async with harness(target, charts, clock) as h:
            await h.connect("a", "b")
            # the last hop never picks up: OK with the result of the last hop that took it
            ok = await h.manager.relay(Task("t"), targets=["a", "b"], task_assignment_timeout=5)
            await h.answer("a", await h.take("a"), "r")
            await h.tick(5)
            outcome = await h.manager.wait(ok)
            assert (outcome.status, outcome.reason, outcome.result) == (OK, "targets_exhausted", "r")
            # nobody ever picks up: TIMEOUT
            silent = await h.manager.relay(Task("t"), targets=["a", "b"], task_assignment_timeout=5)
            await h.tick(5)
            await h.tick(5)
            outcome = await h.manager.wait(silent)
            assert (outcome.status, outcome.results) == (TaskCompletionStatus.TIMEOUT, ())

    asyncio.run(main())


def test_dynamic_targets_join_at_the_end(target: str, charts: ChartRegistry, clock: ManualClock) -> None:
    async def main() -> None:
        async with harness(target, charts, clock) as h:
            await h.connect("a")
            tid = await h.manager.relay(Task("t"), targets=["a"])
            assert await h.manager.process_task_request("z") is None  # z joins as hop 1
            fixed = await h.manager.relay(Task("u"), targets=["a"], dynamic_targets=False)
            assert await h.manager.process_task_request("y") is None  # y joins t only
            await h.answer("a", await h.take("a"), 1)
            hop1 = await h.take("z")
            assert hop1.client_task_id == f"{tid}/1"
            await h.answer("z", hop1, 2)
            await h.answer("y", await h.take("y"), 3)
            assert [r.site for r in (await h.manager.wait(tid)).results] == ["a", "z", "y"]
            assert h.events(tid, "add_target") == [{"site": "z"}, {"site": "y"}]
            assert h.events(fixed, "add_target") == []
            assert (await h.take("a")).task_id == fixed

    asyncio.run(main())


@pytest.mark.parametrize("targets", [[], None])
def test_relay_needs_targets(target: str, charts: ChartRegistry, clock: ManualClock, targets: Any) -> None:
    async def main() -> None:
        async with harness(target, charts, clock) as h:
            with pytest.raises(TaskError) as err:
                await h.manager.relay(Task("t"), targets=targets)
            assert err.value.argument == "targets" and "relay of task 't' needs at least one target" in str(err.value)
            assert h.recorder.last_seq() == 0 and h.manager.get_num_standing_tasks() == 0

    asyncio.run(main())


def test_relay_argument_checks(target: str, charts: ChartRegistry, clock: ManualClock) -> None:
    async def main() -> None:
        async with harness(target, charts, clock) as h:
            await h.connect("a")
            with pytest.raises(TaskError) as order:
                await h.manager.relay(Task("t"), targets=["a"], send_order=SendOrder.ANY)
            assert order.value.argument == "send_order"
            with pytest.raises(TaskError) as longer:
                await h.manager.relay(Task("t", timeout=10), targets=["a"], task_result_timeout=11)
            assert longer.value.argument == "task_result_timeout"
            assert h.manager.get_num_standing_tasks() == 0

    asyncio.run(main())
