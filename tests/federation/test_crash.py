"""Crash tests with real processes: SIGKILL the server or the sites mid-job, the result is unchanged.

Every run is a ``fedlog simulate`` of the linreg FedAvg job (3 rounds, 3 sites): a
server process and three client processes on loopback, each with its own log. The
uncrashed run's result hash is the reference; a crashed run must reach the same hash
and its server log must hold exactly one accepted result per (task, site).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from engine.jobs.catalog import CATALOG
from engine.log.sql import open_recorder
from engine.sim import SimOptions, simulate

pytestmark = pytest.mark.slow

SITES = 3
ROUNDS = 3


def spec() -> dict[str, Any]:
    job = dict(CATALOG["linreg"])
    job["args"] = {**job["args"], "rounds": ROUNDS}
    return job


def run(tmp: Path, name: str, **kw: Any) -> dict[str, Any]:
    summary = simulate(SimOptions(spec=spec(), clients=SITES, workdir=tmp / name, timeout=180, **kw))
    assert summary["status"] == "finished", summary
    assert summary["rounds"] == ROUNDS
    return summary


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The uncrashed run."""
    summary = run(tmp_path_factory.mktemp("ref"), "ref")
    assert summary["kills"] == []
    return summary


def accepted_results(db: str) -> dict[str, int]:
    """How many accepted results each (task, site) holds in the server's log."""
    counts: dict[str, int] = {}
    with open_recorder(db) as log:
        for row in log.machines(kind="client_task"):
            counts[row.machine_id] = sum(1 for e in log.read(machine_id=row.machine_id) if e.trigger == "result")
    return counts


def check_counted_once(db: str) -> None:
    counts = accepted_results(db)
    assert len(counts) == SITES * ROUNDS, counts
    assert set(counts.values()) == {1}, counts


def test_uncrashed_runs_agree(reference: dict[str, Any], tmp_path: Path) -> None:
    again = run(tmp_path, "again")
    assert again["result_hash"] == reference["result_hash"]
    check_counted_once(str(tmp_path / "again" / "server.db"))


def test_server_killed_at_every_phase_finishes_with_the_same_model(reference: dict[str, Any],
                                                                   tmp_path: Path) -> None:
    points = ["0.dispatch", "0.result", "1.aggregate", "2.result"]
    summary = run(tmp_path, "points", kill_server_at=points)
    assert [k["how"] for k in summary["kills"]] == [f"crash point {p}" for p in points]
    assert summary["kills_not_reached"] == []
    assert summary["server_starts"] == len(points) + 1
    assert summary["result_hash"] == reference["result_hash"]
    check_counted_once(str(tmp_path / "points" / "server.db"))
    # the site whose result was recorded but never answered re-submitted it, and it was not counted twice
    assert sum(s["executed"] for s in summary["sites"].values()) == SITES * ROUNDS


def test_server_killed_at_random_instants(reference: dict[str, Any], tmp_path: Path) -> None:
    summary = run(tmp_path, "random", kill_server_random=[11])
    assert any(k["target"] == "server" for k in summary["kills"]), summary
    assert summary["result_hash"] == reference["result_hash"]
    check_counted_once(str(tmp_path / "random" / "server.db"))


def test_clients_killed_mid_task_resume(reference: dict[str, Any], tmp_path: Path) -> None:
    summary = run(tmp_path, "clients", kill_client_random=[3, 4])
    assert sum(s["restarts"] for s in summary["sites"].values()) >= 1, summary
    assert summary["result_hash"] == reference["result_hash"]
    check_counted_once(str(tmp_path / "clients" / "server.db"))


@pytest.mark.postgres
def test_server_killed_on_postgresql(reference: dict[str, Any], tmp_path: Path, pg_url: str) -> None:
    summary = run(tmp_path, "pg", db=pg_url, kill_server_at=["0.result", "1.aggregate", "2.dispatch"])
    assert summary["server_starts"] == 4
    assert summary["result_hash"] == reference["result_hash"]
    check_counted_once(pg_url)


def test_a_locally_defined_executor_is_shipped_to_the_simulated_sites(tmp_path: Path) -> None:
    offset = 0.25  # captured by the closure: only cloudpickle can ship this function

    def local_train(task: Any) -> Any:
        model = task.data["model"]
        return {"model": {k: v + offset for k, v in model.items()}, "n": 1}

    job = {"workflow": "fedavg", "executor": "not.imported:anywhere", "args": {"model": {"b": 1.0}, "rounds": 2}}
    summary = simulate(SimOptions(spec=job, clients=2, workdir=tmp_path / "local", executor=local_train,
                                  timeout=120))
    assert summary["status"] == "finished", summary
    assert summary["result"] == {"b": 1.5}


def test_torch_fedavg_killed_mid_round_ends_with_the_same_model_hash(tmp_path: Path) -> None:
    """Models and updates travel as chunks; server and site kills change nothing in the final model."""
    job = dict(CATALOG["cnn"])
    job["args"] = {**job["args"], "rounds": 3, "epochs": 1}
    clean = simulate(SimOptions(spec=job, clients=SITES, workdir=tmp_path / "clean", timeout=180))
    crashed = simulate(SimOptions(spec=job, clients=SITES, workdir=tmp_path / "crashed", timeout=180,
                                  kill_server_at=["0.result", "1.aggregate", "2.dispatch"], kill_client_random=[9]))
    assert clean["status"] == crashed["status"] == "finished", (clean, crashed)
    assert crashed["result"]["model_hash"] == clean["result"]["model_hash"]
    assert crashed["result_hash"] == clean["result_hash"]
    assert crashed["server_starts"] == 4
    check_counted_once(str(tmp_path / "crashed" / "server.db"))


def test_untouched_sites_share_one_process_and_sites_to_be_killed_get_their_own(tmp_path: Path) -> None:
    summary = run(tmp_path, "mixed", kill_client_random=[3])
    assert summary["status"] == "finished"
    outs = {p.stem for p in (tmp_path / "mixed" / "logs").glob("*.out")}
    own = {name for name in outs if not name.startswith("sites-")}
    shared = [name for name in outs if name.startswith("sites-")]
    killed = {site for site, s in summary["sites"].items() if s["restarts"]}
    assert killed and killed <= own, (killed, outs)
    untouched = sorted(set(summary["sites"]) - own)
    if len(untouched) >= 2:
        assert shared == [f"sites-{untouched[0]}-{untouched[-1]}"], outs
    assert all(s["executed"] >= 1 for s in summary["sites"].values())
