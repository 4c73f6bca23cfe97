"""Many sites at once on one loop: a send binds one site, a broadcast counts each site once."""

from __future__ import annotations

import asyncio

from engine.charts.registry import ChartRegistry
from engine.clock import ManualClock
from engine.tasks import SendOrder, Task, TaskCompletionStatus
from tests.tasks.support import harness

SITES = [f"s{i:02d}" for i in range(20)]


def test_concurrent_requests_bind_a_send_to_exactly_one_site(
        target: str, charts: ChartRegistry, clock: ManualClock) -> None:
    async def main() -> None:
        async with harness(target, charts, clock) as h:
            await h.connect(*SITES)
            tid = await h.manager.send(Task("t"), targets=SITES, send_order=SendOrder.ANY)
            got = await asyncio.gather(*(h.manager.process_task_request(s) for s in SITES))
            winners = [a for a in got if a is not None]
            assert len(winners) == 1
            winner = winners[0]
            states = {s: h.state(f"{tid}/{s}") for s in SITES}
            assert states.pop(winner.site) == "sent" and set(states.values()) == {"cancelled"}
            assert await h.answer(winner.site, winner, 1) == "accepted"
            assert (await h.manager.wait(tid)).status is TaskCompletionStatus.OK

    asyncio.run(main())


def test_concurrent_results_are_each_counted_once(target: str, charts: ChartRegistry, clock: ManualClock) -> None:
    async def main() -> None:
        async with harness(target, charts, clock) as h:
            await h.connect(*SITES)
            tid = await h.manager.broadcast(Task("t"), targets=SITES, min_responses=5)
            assignments = await asyncio.gather(*(h.take(s) for s in SITES))
            # every site asks again while all submit: re-sends interleave with results
            outcomes = await asyncio.gather(*(h.answer(a.site, a, i) for i, a in enumerate(assignments)),
                                            *(h.manager.process_task_request(s) for s in SITES),
                                            *(h.answer(a.site, a, i) for i, a in enumerate(assignments)))
            submitted = outcomes[:20] + outcomes[40:]
            assert submitted.count("accepted") >= 5 and set(submitted) <= {"accepted", "duplicate", "late"}
            outcome = await h.manager.wait(tid)
            assert outcome.status is TaskCompletionStatus.OK
            received = [s for s in SITES if h.state(f"{tid}/{s}") == "result_received"]
            # the outcome is exactly what the log holds, once per site, in target order
            assert [r.site for r in outcome.results] == received
            assert len(received) == submitted.count("accepted")
            assert all(len(h.events(f"{tid}/{s}", "result")) <= 1 for s in SITES)
            assert all(len(h.events(f"{tid}/{s}", "send")) == 1 for s in SITES)

    asyncio.run(main())
