"""Swarm learning with real processes: sites, aggregators and the server SIGKILLed at named points.

Each test runs ``fedlog simulate`` (one server and three site processes, each with its
own log) on the swarm CNN job for three short rounds. With every trainer required
(``min_responses_required`` = 3) the same submissions are aggregated whatever
crashed, so the final model hash must equal an uncrashed run's. The sites' own logs
are then read to check what the issue promises: no duplicate submission counted, an
aggregator that continued (not restarted) its gathering, a replacement aggregator
that took over without any trainer training again, a departure that is survived or
explained.
"""

from __future__ import annotations

import functools
import random
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")

from engine.log.sql import open_recorder  # noqa: E402
from engine.sim import SimOptions, simulate  # noqa: E402

SITES = ["site-1", "site-2", "site-3"]


def spec(min_responses: int = 3) -> dict[str, Any]:
    return {
        "name": "swarm crash test", "workflow": "swarm", "executor": "engine.swarm.site:run",
        "args": {"model": "engine.jobs.cnn:initial_state", "learner": "engine.jobs.cnn:swarm_learn",
                 "num_rounds": 3, "sites": SITES, "learner_args": {"epochs": 1, "lr": 0.05, "batch": 32},
                 "min_responses_required": min_responses, "wait_time_after_min_resps_received": 2,
                 "aggregator_timeout": 3, "learn_task_ack_timeout": 4, "final_result_ack_timeout": 3,
                 "request_to_submit_result_msg_timeout": 3},
    }


def aggregator_of(round_: int) -> str:
    """Round ``round_``'s aggregator when every site is alive (the seeded draw every site makes)."""
    return random.Random(f"job-1/{round_}").choice(SITES)


def run(tmp: Path, name: str, min_responses: int = 3, **kw: Any) -> dict[str, Any]:
    return simulate(SimOptions(spec=spec(min_responses), clients=len(SITES), workdir=tmp / name, timeout=180, **kw))


@functools.cache
def baseline(tmp: Path) -> str:
    summary = run(tmp, "baseline")
    assert summary["status"] == "finished", summary["reason"]
    return str(summary["result"]["model_hash"])


@pytest.fixture(scope="module")
def uncrashed(tmp_path_factory: pytest.TempPathFactory) -> str:
    return baseline(tmp_path_factory.mktemp("swarm"))


def events(workdir: Path, site: str, machine_id: str) -> list[tuple[str, dict[str, Any]]]:
    with open_recorder(workdir / f"{site}.db") as log:
        return [(e.trigger, dict(e.data or {})) for e in log.read(machine_id=machine_id)]


def triggers(workdir: Path, site: str, machine_id: str) -> list[str]:
    return [t for t, _ in events(workdir, site, machine_id)]


def test_uncrashed_swarm_reaches_the_digits_accuracy(uncrashed: str, tmp_path: Path) -> None:
    assert len(uncrashed) == 64
    # every site ran every round as a trainer and the swarm's end was recorded everywhere
    work = tmp_path  # the baseline's own folder is private to the fixture: check a fresh, equal run
    summary = run(work, "again")
    assert summary["result"]["model_hash"] == uncrashed
    for site in SITES:
        for r in range(3):
            assert triggers(work / "again", site, f"swarm:job-1:{r}:train")[-1] == "round_closed"
        assert triggers(work / "again", site, "swarm:job-1:end") == ["create", "final_received"]


def test_trainer_killed_mid_training_resumes_its_round(uncrashed: str, tmp_path: Path) -> None:
    victim = next(s for s in SITES if s != aggregator_of(1))
    summary = run(tmp_path, "train", kill_site_at=[f"{victim}:1.train"])
    assert [k["how"] for k in summary["kills"]] == ["crash point 1.train"]
    assert summary["status"] == "finished" and summary["result"]["model_hash"] == uncrashed
    # the round was taken up again in `training` from the log: trained (and submitted) once
    assert triggers(tmp_path / "train", victim, "swarm:job-1:1:train")[:3] == ["create", "train", "trained"]


def test_trainer_killed_mid_upload_is_counted_once(uncrashed: str, tmp_path: Path) -> None:
    victim = next(s for s in SITES if s != aggregator_of(1))
    summary = run(tmp_path, "upload", kill_site_at=[f"{victim}:1.upload"])
    assert [k["how"] for k in summary["kills"]] == ["crash point 1.upload"]
    assert summary["status"] == "finished" and summary["result"]["model_hash"] == uncrashed
    mine = triggers(tmp_path / "upload", victim, "swarm:job-1:1:train")
    assert mine.count("trained") == 1, "the stored result was submitted, not computed again"
    accepts = [d["site"] for t, d in events(tmp_path / "upload", aggregator_of(1), "swarm:job-1:1:aggr")
               if t == "accept"]
    assert sorted(accepts) == SITES, "each trainer's result counted exactly once"


def test_aggregator_killed_mid_gather_continues_with_what_it_had(uncrashed: str, tmp_path: Path) -> None:
    aggr = aggregator_of(1)
    summary = run(tmp_path, "gather", kill_site_at=[f"{aggr}:1.gather"])
    assert [k["target"] for k in summary["kills"]] == [aggr]
    assert summary["status"] == "finished" and summary["result"]["model_hash"] == uncrashed
    rows = events(tmp_path / "gather", aggr, "swarm:job-1:1:aggr")
    names = [t for t, _ in rows]
    assert names.count("gather") == 1, "gathering went on after the restart; it did not start again"
    assert sorted(d["site"] for t, d in rows if t == "accept") == SITES
    assert "take_over" not in names and names[-1] == "scattered"


def test_server_killed_mid_swarm_changes_nothing(uncrashed: str, tmp_path: Path) -> None:
    # the swarm's rounds are ~280 relayed aux events in the server's log (seq 32-313 in an
    # uncrashed run): the 150th lands in their middle however fast the machine is
    summary = run(tmp_path, "server", kill_server_after_events=[150])
    assert [k["target"] for k in summary["kills"]] == ["server"] and summary["server_starts"] == 2
    assert summary["status"] == "finished" and summary["result"]["model_hash"] == uncrashed


def test_a_dead_aggregator_is_replaced_and_no_trainer_trains_again(tmp_path: Path) -> None:
    aggr = aggregator_of(1)
    summary = run(tmp_path, "replace", min_responses=2, leave_site_at=[f"{aggr}:1.gather"])
    assert summary["status"] == "finished", summary["reason"]
    order = SITES[SITES.index(aggr) + 1:] + SITES[:SITES.index(aggr)]
    successor = order[0]
    took = triggers(tmp_path / "replace", successor, "swarm:job-1:1:aggr")
    assert took[:2] == ["create", "take_over"] and "scattered" in took
    for site in order:
        mine = triggers(tmp_path / "replace", site, "swarm:job-1:1:train")
        assert mine.count("trained") == 1, f"{site} trained round 1 again"
        assert "aggregator_replaced" in mine


def test_a_site_that_leaves_is_survived_while_the_minimum_holds(tmp_path: Path) -> None:
    victim = next(s for s in reversed(SITES) if s != aggregator_of(1))
    summary = run(tmp_path, "leave", min_responses=2, leave_site_at=[f"{victim}:1.train"])
    assert summary["status"] == "finished", summary["reason"]
    assert summary["sites"][victim]["left"] is True
    aggr2 = [s for s in SITES if s != victim and triggers(tmp_path / "leave", s, "swarm:job-1:2:aggr")]
    assert aggr2, "round 2 was aggregated"


def test_a_site_that_leaves_fails_the_swarm_with_the_reason_when_the_minimum_cannot_hold(tmp_path: Path) -> None:
    victim = next(s for s in reversed(SITES) if s != aggregator_of(1))
    summary = run(tmp_path, "fail", min_responses=3, leave_site_at=[f"{victim}:1.train"])
    assert summary["status"] == "failed"
    assert "min_responses_required=3 cannot be met" in summary["reason"] and victim in summary["reason"]
