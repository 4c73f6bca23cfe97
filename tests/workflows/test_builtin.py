"""The built-in workflows: FedAvg's exact weighted mean, cyclic relay, and both across a restart."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from engine.charts.registry import ChartRegistry
from engine.clock import ManualClock
from engine.errors import TaskError
from engine.tasks import TaskCompletionStatus, TaskOutcome, TaskResult
from engine.workflows import WorkflowRunner, cyclic, fedavg, weighted_mean
from tests.tasks.support import harness
from tests.workflows.support import SITES, records, results_per_share, serve

MODEL = {"w": [0.0, 1.0], "b": 0.5}
# offsets 1, 2, 4 weighted 1, 1, 2 move every weight by (1 + 2 + 8) / 4 = 2.75 a round (exact in binary)
FEDAVG_3 = {"w": [8.25, 9.25], "b": 8.75}


def test_fedavg_over_three_sites_gives_the_exact_weighted_mean(target: str, charts: ChartRegistry,
                                                               clock: ManualClock) -> None:
    async def main() -> Any:
        async with harness(target, charts, clock) as h:
            await h.connect(*SITES)
            runner = WorkflowRunner(h.manager, fedavg, job_id="j", args={"model": MODEL, "rounds": 3})
            await runner.start()
            assert await serve(runner, h.manager, SITES) == 9
            result = await runner.result()
            assert h.state("j.workflow") == "finished"
            assert h.events("j.workflow", "finish") == [{"result": FEDAVG_3}]
            published = [r for r in records(h.recorder, "j") if r["op"] == "publish"]
            assert [p["value"] for p in published] == [
                {"model": {"w": [2.75, 3.75], "b": 3.25}, "sites": ["a", "b", "c"], "n": 4.0},
                {"model": {"w": [5.5, 6.5], "b": 6.0}, "sites": ["a", "b", "c"], "n": 4.0},
                {"model": FEDAVG_3, "sites": ["a", "b", "c"], "n": 4.0},
            ]
            # call indices are shared: broadcast, publish, checkpoint per round
            assert [(r["call"], r["op"]) for r in records(h.recorder, "j")] == [
                (2, "publish"), (3, "checkpoint"), (5, "publish"), (6, "checkpoint"), (8, "publish"),
                (9, "checkpoint")]
            assert [h.state(f"j.t{i}") for i in (1, 4, 7)] == ["completed"] * 3
            return result

    assert asyncio.run(main()) == FEDAVG_3


def test_weighted_mean_sums_in_site_order_and_checks_shapes() -> None:
    def outcome(*results: tuple[str, Any]) -> TaskOutcome:
        return TaskOutcome("x.t1", "train", TaskCompletionStatus.OK,
                           tuple(TaskResult(site, f"x.t1/{site}", r) for site, r in results))

    got = weighted_mean(outcome(("b", {"model": {"v": 3}, "n": 3}), ("a", {"model": {"v": 1}, "n": 1})), {"v": 0})
    assert got == ({"v": 2.5}, ["a", "b"], 4.0)
    with pytest.raises(TaskError, match="no result"):
        weighted_mean(outcome(), {"v": 0})
    with pytest.raises(TaskError, match="a's entry 'v' does not have the shape"):
        weighted_mean(outcome(("a", {"model": {"v": [1, 2]}, "n": 1})), {"v": 0})
    with pytest.raises(TaskError, match="b's example count"):
        weighted_mean(outcome(("b", {"model": {"v": 1}, "n": 0})), {"v": 0})


def test_cyclic_relays_the_model_through_the_sites(target: str, charts: ChartRegistry, clock: ManualClock) -> None:
    seen: list[tuple[str, Any]] = []

    async def main() -> Any:
        async with harness(target, charts, clock) as h:
            await h.connect(*SITES)
            runner = WorkflowRunner(h.manager, cyclic, job_id="cy",
                                    args={"model": {"v": 0.0}, "rounds": 2, "targets": ["c", "a", "b"]})
            await runner.start()
            await serve(runner, h.manager, SITES, seen=seen)
            published = [r["value"] for r in records(h.recorder, "cy") if r["op"] == "publish"]
            assert published == [{"model": {"v": 7.0}, "sites": ["c", "a", "b"]},
                                 {"model": {"v": 14.0}, "sites": ["c", "a", "b"]}]
            return await runner.result()

    assert asyncio.run(main()) == {"v": 14.0}
    # each hop's input is the previous hop's result
    assert seen == [("c", {"round": 0, "model": {"v": 0.0}}), ("a", {"round": 0, "model": {"v": 4.0}}),
                    ("b", {"round": 0, "model": {"v": 5.0}}), ("c", {"round": 1, "model": {"v": 7.0}}),
                    ("a", {"round": 1, "model": {"v": 11.0}}), ("b", {"round": 1, "model": {"v": 12.0}})]


@pytest.mark.parametrize("stop_after", [1, 4, 5, 8])
def test_fedavg_after_a_restart_mid_round_equals_an_uninterrupted_run(
        sql_url: str, charts: ChartRegistry, stop_after: int) -> None:
    clock = ManualClock()
    args = {"model": MODEL, "rounds": 3}

    async def before() -> int:
        async with harness(sql_url, charts, clock) as h:
            await h.connect(*SITES)
            runner = WorkflowRunner(h.manager, fedavg, job_id="j", args=args)
            await runner.start()
            submitted = await serve(runner, h.manager, SITES, stop_after=stop_after)
            assert not runner.done()
            await runner.close()  # then the runtime and the log close: the server is gone
            return submitted

    assert asyncio.run(before()) == stop_after
    clock.advance(5)

    async def after() -> Any:
        async with harness(sql_url, charts, clock) as h:
            runner = WorkflowRunner(h.manager, fedavg, job_id="j", args=args)
            await runner.recover_and_start()
            assert await serve(runner, h.manager, SITES) == 9 - stop_after
            result = await runner.result()
            assert runner.ctl is not None and runner.ctl.replayed_calls == 1  # only the round in progress
            assert h.state("j.workflow") == "finished"
            # every site's result was counted exactly once, in every round
            assert sorted(results_per_share(h.recorder, "j").items()) == [
                (f"j.t{i}/{site}", 1) for i in (1, 4, 7) for site in SITES]
            published = [(r["call"], r["value"]["sites"], r["value"]["n"]) for r in records(h.recorder, "j")
                         if r["op"] == "publish"]
            assert published == [(2, ["a", "b", "c"], 4.0), (5, ["a", "b", "c"], 4.0), (8, ["a", "b", "c"], 4.0)]
            return result

    assert asyncio.run(after()) == FEDAVG_3


def test_cyclic_after_a_restart_mid_relay(sqlite_path: str, charts: ChartRegistry) -> None:
    clock = ManualClock()
    args = {"model": {"v": 0.0}, "rounds": 2, "targets": list(SITES)}

    async def before() -> None:
        async with harness(sqlite_path, charts, clock) as h:
            await h.connect(*SITES)
            runner = WorkflowRunner(h.manager, cyclic, job_id="cy", args=args)
            await runner.start()
            await serve(runner, h.manager, SITES, stop_after=4)  # round 1: a answered, b holds its hop
            await runner.close()

    asyncio.run(before())

    async def after() -> Any:
        async with harness(sqlite_path, charts, clock) as h:
            runner = WorkflowRunner(h.manager, cyclic, job_id="cy", args=args)
            await runner.recover_and_start()
            assert await serve(runner, h.manager, SITES) == 2
            assert sorted(results_per_share(h.recorder, "cy").values()) == [1] * 6
            return await runner.result()

    assert asyncio.run(after()) == {"v": 14.0}
