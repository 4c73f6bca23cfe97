"""The Gatherer: admission (max_concurrent_submissions, duplicates, expired grants), completion, aggregation."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from engine.swarm.config import SwarmConfig  # noqa: E402
from engine.swarm.gatherer import Gatherer, Submission  # noqa: E402

US = 1_000_000
SITES = ["a", "b", "c"]


def gatherer(**kw: object) -> Gatherer:
    cfg = SwarmConfig.from_json({"sites": SITES, "num_rounds": 2, "learner": "m:f", "min_responses_required": 2,
                                 "grant_timeout": 10, **kw})
    return Gatherer(cfg, 1, list(SITES))


def test_at_most_max_concurrent_submissions_hold_a_slot() -> None:
    g = gatherer()
    assert g.can_accept_submission("a", 0) == "ok"
    g.grants["a"] = 0
    assert g.can_accept_submission("a", 1) == "granted"
    assert g.can_accept_submission("b", 1) == "busy"
    g.gather(Submission("a", "d" * 64, 10, 0.5))
    assert g.can_accept_submission("b", 2) == "ok"
    assert g.can_accept_submission("a", 2) == "duplicate"
    assert g.can_accept_submission("z", 2) == "unknown_trainer"


def test_an_unused_grant_expires_so_a_dead_trainer_does_not_block_the_slot() -> None:
    g = gatherer()
    g.grants["a"] = 0
    assert g.can_accept_submission("b", 9 * US) == "busy"
    assert g.can_accept_submission("b", 10 * US) == "ok"


def test_a_repeated_submission_is_counted_once() -> None:
    g = gatherer()
    assert g.gather(Submission("a", "d" * 64, 10, None))
    assert not g.gather(Submission("a", "e" * 64, 10, None))
    assert len(g.accepted) == 1 and g.accepted["a"].model == "d" * 64


def test_completion_follows_the_reference_rules() -> None:
    g = gatherer()
    assert g.is_done("gathering", 0, None) is None
    g.gather(Submission("a", "d" * 64, 1, None))
    g.gather(Submission("b", "d" * 64, 1, None))
    assert g.is_done("gathering", 0, None) == "min_reached"
    assert g.is_done("min_received", 5, 10) is None
    assert g.is_done("min_received", 10, 10) == "wait_elapsed"
    g.gather(Submission("c", "d" * 64, 1, None))
    assert g.is_done("min_received", 5, 10) == "all_received"
    late = gatherer()
    assert late.is_done("gathering", 10, 10) == "timeout"


def test_absent_trainers_are_not_waited_for_and_an_unreachable_minimum_is_explained() -> None:
    g = gatherer()
    g.gather(Submission("a", "d" * 64, 1, None))
    g.gather(Submission("b", "d" * 64, 1, None))
    g.absent.add("c")
    assert g.is_done("min_received", 0, 99) == "all_received"
    h = gatherer(min_responses_required=3)
    h.gather(Submission("a", "d" * 64, 1, None))
    assert h.unreachable_reason() is None
    h.absent.add("c")
    reason = h.unreachable_reason()
    assert reason is not None and "min_responses_required=3 cannot be met" in reason and "gone: c" in reason


def test_aggregate_is_the_weighted_mean_whatever_order_results_arrived_in() -> None:
    models = {s: {"w": torch.full((3,), float(i + 1)), "k": torch.tensor([i], dtype=torch.int64)}
              for i, s in enumerate(SITES)}
    ns = {"a": 1.0, "b": 2.0, "c": 5.0}
    results = []
    for order in (SITES, list(reversed(SITES))):
        g = gatherer()
        for s in order:
            g.gather(Submission(s, s, ns[s], 0.1 * ns[s]))
        mean, sites, total, metric = g.aggregate(lambda d: models[d])
        results.append(mean)
        assert sites == SITES and total == 8.0
        assert metric == pytest.approx(sum(0.1 * n * n for n in ns.values()) / 8.0)
    assert torch.equal(results[0]["w"], results[1]["w"])
    assert torch.allclose(results[0]["w"], torch.full((3,), (1 * 1 + 2 * 2 + 3 * 5) / 8.0))
