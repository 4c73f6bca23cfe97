"""Federated statistics: the combined figures equal the central ones exactly, however the rows are split."""

from __future__ import annotations

import asyncio
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.charts.registry import ChartRegistry
from engine.client.executor import SiteTask
from engine.clock import ManualClock
from engine.errors import TaskError
from engine.jobs.fedstats import _load, fedstats, site_stats
from engine.tasks import TaskManager
from engine.workflows import WorkflowRunner
from tests.tasks.support import harness


def central(dataset: str, bins: int) -> dict[str, Any]:
    """The statistics computed over the whole data set in one place."""
    data, names = _load(dataset)
    n = len(data)
    means = [sum((Fraction(float(v)) for v in col), Fraction(0)) / n for col in data.T]
    variances = [sum((Fraction(float(v)) ** 2 for v in col), Fraction(0)) / n - m * m
                 for col, m in zip(data.T, means, strict=True)]
    edges = [np.linspace(col.min(), col.max(), bins + 1) if col.max() > col.min()
             else np.linspace(col.min(), col.min() + 1, bins + 1) for col in data.T]
    hists = [[int(x) for x in np.histogram(col, bins=e)[0]] for col, e in zip(data.T, edges, strict=True)]
    return {"count": n, "features": list(names), "mean_exact": means, "variance_exact": variances,
            "min": [float(c.min()) for c in data.T], "max": [float(c.max()) for c in data.T], "histograms": hists}


async def serve(runner: WorkflowRunner, manager: TaskManager, sites: list[str],
                answer: Any = site_stats) -> None:
    """Answer every assignment with the executor until the workflow ends."""
    waits = 0
    while (got := await asyncio.wait_for(runner.next_wait(waits), 60)) is not None:
        waits = got
        for site in sites:
            a = await manager.process_task_request(site)
            if a is None:
                continue
            task = SiteTask("job", a.task_id, a.client_task_id, a.name, a.data, a.props, site,
                            job_sites=tuple(sorted(sites)))
            await manager.process_submission(site, a.task_id, a.client_task_id, answer(task))


def run(target: str, charts: ChartRegistry, clock: ManualClock, sites: list[str], answer: Any = site_stats,
        **args: Any) -> Any:
    async def main() -> Any:
        async with harness(target, charts, clock) as h:
            await h.connect(*sites)
            runner = WorkflowRunner(h.manager, fedstats, job_id="job", args=args)
            await runner.start()
            await serve(runner, h.manager, sites, answer)
            return await runner.result()

    return asyncio.run(main())


@pytest.mark.parametrize("sites", [["a"], ["a", "b"], ["a", "b", "c"]])
def test_combined_statistics_equal_the_central_ones_exactly(sites: list[str], tmp_path: Path,
                                                            charts: ChartRegistry, clock: ManualClock) -> None:
    got = run(str(tmp_path / "log.db"), charts, clock, sites, dataset="wine", bins=7)
    want = central("wine", 7)
    assert got["sites"] == sites and got["count"] == want["count"] == 178
    assert [Fraction(m) for m in got["mean_exact"]] == want["mean_exact"]
    assert [Fraction(v) for v in got["variance_exact"]] == want["variance_exact"]
    assert got["mean"] == [float(m) for m in want["mean_exact"]]
    assert got["min"] == want["min"] and got["max"] == want["max"]
    assert got["histograms"] == want["histograms"]
    assert all(sum(h) == 178 for h in got["histograms"])


def test_another_data_set_and_the_memory_log(charts: ChartRegistry, clock: ManualClock) -> None:
    got = run("memory", charts, clock, ["a", "b"], dataset="iris", bins=4)
    want = central("iris", 4)
    assert got["features"] == want["features"] and got["histograms"] == want["histograms"]
    assert [Fraction(v) for v in got["variance_exact"]] == want["variance_exact"]


def test_a_malformed_site_result_fails_naming_the_site(charts: ChartRegistry, clock: ManualClock) -> None:
    def liar(task: SiteTask) -> Any:
        good = site_stats(task)
        return {**good, "sum": good["sum"][:-1]} if task.site == "b" else good

    with pytest.raises(TaskError, match="b's stats result is malformed"):
        run("memory", charts, clock, ["a", "b"], answer=liar)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(TaskError, match="dataset: must be one of"):
        site_stats(SiteTask("j", "j.t1", "j.t1/a", "stats", {"dataset": "titanic"}, {}, "a", ("a",)))
    with pytest.raises(TaskError, match="not 'train'"):
        site_stats(SiteTask("j", "j.t1", "j.t1/a", "train", {}, {}, "a", ("a",)))
