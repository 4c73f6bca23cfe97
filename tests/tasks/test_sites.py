"""Site liveness (connect, heartbeat, missing, dead, reconnect) and dead-client handling."""

from __future__ import annotations

import asyncio

from engine.charts.registry import ChartRegistry
from engine.clock import ManualClock
from engine.tasks import Task, TaskCompletionStatus
from tests.tasks.support import US, harness


def test_heartbeats_missing_dead_and_reconnect(target: str, charts: ChartRegistry, clock: ManualClock) -> None:
    changes: list[tuple[str, str]] = []

    async def main() -> None:
        async with harness(target, charts, clock, heartbeat_timeout=30, dead_grace=20,
                           heartbeat_record_interval=5) as h:
            h.manager.add_site_listener(lambda site, state: changes.append((site, state)))
            assert await h.manager.heartbeat("a") == "active"
            start = clock.now_us()
            await h.tick(4)
            await h.manager.heartbeat("a")  # moves the deadline by 4 s < 5 s: not recorded
            assert h.triggers("site:a") == ["create", "connect"]
            await h.tick(1)
            await h.manager.client_is_active("a", "poll")
            assert h.triggers("site:a") == ["create", "connect", "heartbeat"]
            row = h.recorder.get_machine("site:a")
            assert row is not None and row.deadline_us == start + 35 * US
            await h.tick(29.999999)
            assert h.manager.site_state("a") == "active"
            await h.tick(0.000001)
            assert h.manager.site_state("a") == "missing"
            # the grace counts from the overdue heartbeat, as configured (not the chart's 60 s)
            row = h.recorder.get_machine("site:a")
            assert row is not None and row.deadline_us == start + 55 * US
            await h.tick(20)
            assert h.manager.site_state("a") == "dead" and h.state("site:a") == "dead"
            assert await h.manager.client_is_active("a", "poll") == "active"
            assert h.triggers("site:a") == ["create", "connect", "heartbeat", "timeout", "report_dead", "timeout",
                                            "reconnect"]
            assert changes == [("a", "registered"), ("a", "active"), ("a", "missing"), ("a", "dead"),
                               ("a", "active")]

    asyncio.run(main())


def test_dead_client_report_starts_the_grace(target: str, charts: ChartRegistry, clock: ManualClock) -> None:
    async def main() -> None:
        async with harness(target, charts, clock, dead_grace=10) as h:
            await h.connect("a")
            await h.manager.process_dead_client_report("a")
            assert h.manager.site_state("a") == "missing"
            await h.tick(5)
            await h.manager.process_dead_client_report("a")  # already on the watch list: no change
            assert h.triggers("site:a") == ["create", "connect", "report_dead"]
            await h.tick(5)
            assert h.manager.site_state("a") == "dead"
            await h.manager.process_dead_client_report("nobody")
            assert h.recorder.get_machine("site:nobody") is None

    asyncio.run(main())


def test_client_dead_only_when_every_remaining_target_is_dead_and_after_the_grace(
        target: str, charts: ChartRegistry, clock: ManualClock) -> None:
    async def main() -> None:
        async with harness(target, charts, clock, dead_grace=5, client_dead_grace=30) as h:
            await h.connect("a", "b", "c")
            tid = await h.manager.broadcast(Task("t"), targets=["a", "b", "c"])
            await h.answer("a", await h.take("a"), 1)
            b = await h.take("b")
            await h.manager.process_dead_client_report("b")
            await h.tick(5)
            assert h.manager.site_state("b") == "dead"
            assert h.state(tid) == "standing"  # c is alive
            await h.manager.process_dead_client_report("c")
            await h.tick(5)
            assert h.manager.site_state("c") == "dead"
            await h.connect("a")
            # b and c, all that is left, are dead, but the task is 10 s old: wait for 30 s
            await h.tick(19.999999)
            assert h.state(tid) == "standing"
            await h.tick(0.000001)
            outcome = await h.manager.wait(tid)
            assert outcome.status is TaskCompletionStatus.CLIENT_DEAD
            assert [r.site for r in outcome.results] == ["a"]
            assert h.events(tid, "targets_dead")[0]["dead"] == ["b", "c"]
            assert h.state(b.client_task_id) == "client_dead" and h.state(f"{tid}/c") == "client_dead"

    asyncio.run(main())


def test_a_dead_site_that_reconnects_may_still_answer(target: str, charts: ChartRegistry, clock: ManualClock) -> None:
    async def main() -> None:
        async with harness(target, charts, clock, dead_grace=5, client_dead_grace=0) as h:
            await h.connect("a", "b")
            tid = await h.manager.broadcast(Task("t"), targets=["a", "b"])
            b = await h.take("b")
            await h.answer("a", await h.take("a"), 1)
            await h.manager.process_dead_client_report("b")
            await h.tick(4)
            assert h.state(tid) == "standing"  # missing is not dead
            assert await h.answer("b", b, 2) == "accepted"
            outcome = await h.manager.wait(tid)
            assert outcome.status is TaskCompletionStatus.OK and h.manager.site_state("b") == "active"

    asyncio.run(main())


def test_a_dead_site_ends_a_task_waiting_only_on_it(target: str, charts: ChartRegistry, clock: ManualClock) -> None:
    async def main() -> None:
        async with harness(target, charts, clock, heartbeat_timeout=10, dead_grace=10,
                           client_dead_grace=30) as h:
            await h.connect("a", "b")
            bound = await h.manager.send(Task("t"), targets=["a", "b"], send_order="any")
            await h.take("a")
            for _ in range(3):  # a goes silent; b keeps polling (and is no candidate any more)
                await h.tick(10)
                await h.connect("b")
            assert h.manager.site_state("a") == "dead"
            outcome = await h.manager.wait(bound)
            assert outcome.status is TaskCompletionStatus.CLIENT_DEAD
            assert h.state(f"{bound}/a") == "client_dead" and h.state(f"{bound}/b") == "cancelled"

    asyncio.run(main())
