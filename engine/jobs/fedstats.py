"""Federated statistics: per-site count, mean, variance, min/max and histograms, combined exactly.

The main demo job. Each site takes its shard of a data set that scikit-learn ships
(row ``i`` belongs to the site at position ``i % n`` of the sorted site list), so no
data is downloaded and every run sees the same rows.

Round 0 (task ``stats``): each site returns, per feature, its row count, the exact
sum and sum of squares of its values (``fractions.Fraction`` of the float values,
encoded as ``"p/q"`` strings: a float is an exact rational) and its min/max. The
server adds them exactly, so the global mean ``S/N`` and population variance
``Q/N - (S/N)**2`` are exact rationals, independent of how the rows were split.

Round 1 (task ``histogram``): the server sends bin edges computed from the global
min/max; each site counts its values per bin (``numpy.histogram``: the last bin is
closed) and the server sums the integer counts.

Results are folded in site order, so a controller replayed after a crash computes
the same value; the result's floats are the exact fractions rounded once.
"""

from __future__ import annotations

import functools
from fractions import Fraction
from typing import Any

import numpy as np

from engine.client.executor import SiteTask
from engine.errors import TaskError
from engine.tasks import Task, TaskOutcome
from engine.workflows.controller import Controller

__all__ = ["DATASETS", "fedstats", "site_stats"]

#: the data sets a site can read (all shipped inside scikit-learn)
DATASETS = ("wine", "iris", "breast_cancer", "digits")


def _check_dataset(dataset: Any, argument: str = "dataset") -> str:
    if dataset not in DATASETS:
        raise TaskError(argument, f"must be one of {', '.join(DATASETS)}, got {dataset!r}")
    return str(dataset)


@functools.cache
def _load(dataset: str) -> tuple[Any, tuple[str, ...]]:
    from sklearn import datasets

    bunch = getattr(datasets, f"load_{dataset}")()
    names = tuple(str(n) for n in getattr(bunch, "feature_names", [])) or tuple(
        f"x{j}" for j in range(bunch.data.shape[1]))
    return np.asarray(bunch.data, dtype=np.float64), names


def _shard(dataset: str, site: str, sites: list[str]) -> Any:
    data, _ = _load(dataset)
    ordered = sorted(sites) or [site]
    if site not in ordered:
        raise TaskError("sites", f"{site!r} is not one of the job's sites {ordered}")
    return data[np.arange(len(data)) % len(ordered) == ordered.index(site)]


def _frac(text: Any, site: str, what: str) -> Fraction:
    try:
        return Fraction(str(text))
    except (ValueError, ZeroDivisionError):
        raise TaskError("results", f"{site}'s {what} must be an exact fraction 'p/q', got {text!r}") from None


# -- the site's side ---------------------------------------------------------------------


def site_stats(task: SiteTask) -> dict[str, Any]:
    """The executor: answers ``stats`` and ``histogram`` tasks for this site's shard."""
    data = task.data if isinstance(task.data, dict) else {}
    dataset = _check_dataset(data.get("dataset", "wine"), "data.dataset")
    sites = list(data.get("sites") or task.job_sites)
    rows = _shard(dataset, task.site, sites)
    if task.name == "stats":
        columns = rows.T
        sums = [sum((Fraction(float(v)) for v in col), Fraction(0)) for col in columns]
        squares = [sum((Fraction(float(v)) ** 2 for v in col), Fraction(0)) for col in columns]
        return {"count": int(rows.shape[0]), "sum": [str(s) for s in sums], "sum_sq": [str(q) for q in squares],
                "min": [float(c.min()) if len(c) else None for c in columns],
                "max": [float(c.max()) if len(c) else None for c in columns]}
    if task.name == "histogram":
        edges = data.get("edges")
        if not isinstance(edges, list) or len(edges) != rows.shape[1]:
            raise TaskError("data.edges", f"expected one list of bin edges per feature, got {edges!r}")
        return {"counts": [[int(c) for c in np.histogram(rows[:, j], bins=np.asarray(e, dtype=np.float64))[0]]
                           for j, e in enumerate(edges)]}
    raise TaskError("task.name", f"fedstats sites answer 'stats' and 'histogram', not {task.name!r}")


# -- the server's side --------------------------------------------------------------------


def _combine_stats(outcome: TaskOutcome, features: int) -> dict[str, Any]:
    by_site = outcome.by_site()
    if not by_site:
        raise TaskError("results", f"task {outcome.task_id!r} ended {outcome.status.value} with no result")
    count, sums, squares = 0, [Fraction(0)] * features, [Fraction(0)] * features
    lows: list[float | None] = [None] * features
    highs: list[float | None] = [None] * features
    for site in sorted(by_site):
        r = by_site[site]
        if not isinstance(r, dict) or not all(isinstance(r.get(k), list) and len(r[k]) == features
                                             for k in ("sum", "sum_sq", "min", "max")) \
                or not isinstance(r.get("count"), int) or r["count"] < 0:
            raise TaskError("results", f"{site}'s stats result is malformed: expected count and {features} "
                                       f"sum/sum_sq/min/max entries, got {r!r}")
        count += r["count"]
        for j in range(features):
            sums[j] += _frac(r["sum"][j], site, "sum")
            squares[j] += _frac(r["sum_sq"][j], site, "sum_sq")
            lo, hi = r["min"][j], r["max"][j]
            if lo is not None:
                lows[j] = lo if lows[j] is None else min(lows[j], lo)
            if hi is not None:
                highs[j] = hi if highs[j] is None else max(highs[j], hi)
    if count == 0:
        raise TaskError("results", "the sites hold no rows")
    means = [s / count for s in sums]
    variances = [q / count - m * m for q, m in zip(squares, means, strict=True)]
    return {"sites": sorted(by_site), "count": count, "mean_exact": [str(m) for m in means],
            "variance_exact": [str(v) for v in variances], "mean": [float(m) for m in means],
            "variance": [float(v) for v in variances], "min": lows, "max": highs}


def _edges(lo: float, hi: float, bins: int) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0  # a constant feature: one bin holds everything
    return [float(v) for v in np.linspace(lo, hi, bins + 1)]


def _combine_histograms(outcome: TaskOutcome, edges: list[list[float]]) -> list[list[int]]:
    by_site = outcome.by_site()
    if not by_site:
        raise TaskError("results", f"task {outcome.task_id!r} ended {outcome.status.value} with no result")
    totals = [[0] * (len(e) - 1) for e in edges]
    for site in sorted(by_site):
        counts = by_site[site].get("counts") if isinstance(by_site[site], dict) else None
        if not isinstance(counts, list) or len(counts) != len(edges) or any(
                not isinstance(c, list) or len(c) != len(t) or not all(isinstance(x, int) for x in c)
                for c, t in zip(counts, totals, strict=False)):
            raise TaskError("results", f"{site}'s histogram result is malformed: {by_site[site]!r}")
        for t, c in zip(totals, counts, strict=True):
            for i, x in enumerate(c):
                t[i] += x
    return totals


def fedstats(ctl: Controller, dataset: str = "wine", bins: int = 10, min_clients: int = 0,
             targets: list[str] | None = None, timeout: float = 0) -> dict[str, Any]:
    """The server's workflow: a ``stats`` round, then a ``histogram`` round with global bin edges.

    ``targets`` (default: every live site) are named in the task data as ``sites`` when
    given; otherwise each site shards by the task's targets (``SiteTask.job_sites``).
    """
    dataset = _check_dataset(dataset)
    if isinstance(bins, bool) or not isinstance(bins, int) or not 1 <= bins <= 1000:
        raise TaskError("bins", f"must be an integer from 1 to 1000, got {bins!r}")
    _, names = _load(dataset)
    features = len(names)
    base: dict[str, Any] = {"dataset": dataset}
    if targets is not None:
        base["sites"] = sorted(targets)
    state = ctl.resume_point() or {"round": 0}
    if state["round"] == 0:
        ctl.logger.info("round 0: per-site statistics of %s", dataset)
        outcome = ctl.broadcast_and_wait(Task("stats", data={**base, "round": 0}, timeout=timeout),
                                         targets=targets, min_responses=min_clients)
        stats = _combine_stats(outcome, features)
        ctl.publish({k: stats[k] for k in ("sites", "count", "mean_exact", "variance_exact")}, round=0)
        state = {"round": 1, "stats": stats}
        ctl.checkpoint(state)
    stats = state["stats"]
    edges = [_edges(lo if lo is not None else 0.0, hi if hi is not None else 0.0, bins)
             for lo, hi in zip(stats["min"], stats["max"], strict=True)]
    ctl.logger.info("round 1: histograms with %d bins", bins)
    outcome = ctl.broadcast_and_wait(Task("histogram", data={**base, "round": 1, "edges": edges}, timeout=timeout),
                                     targets=targets, min_responses=min_clients)
    histograms = _combine_histograms(outcome, edges)
    ctl.publish({"histograms": histograms}, round=1)
    return {"dataset": dataset, "features": list(names), **stats, "histograms": histograms, "bin_edges": edges}
