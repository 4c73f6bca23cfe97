"""Golden logs: recorded runs that must keep replaying, and one that must not.

Each folder under ``tests/golden/logs`` holds logs recorded by ``tests/golden/record.py``:

- ``fedavg_crash``: the linreg FedAvg job (3 rounds, 2 sites) with the server SIGKILLed
  right after aggregating round 1 — its log must verify (every event legal under its
  chart version, the projection equal to the fold) and its workflow must replay
  offline call for call, to the recorded result;
- ``torch_crash``: FedAvg on the CNN with the server killed after round 0's results —
  the same, and every round re-aggregates from the stored chunks to the published hash;
- ``stream_resume``: a site's log whose task-data download was cut and resumed;
- ``nondeterministic``: a workflow that publishes the wall clock: its replay must fail
  with ``NondeterminismError``.

A change that breaks one of these breaks every log users already have.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from engine.charts.loader import load_charts
from engine.chunks import LocalChunkStore
from engine.errors import NondeterminismError
from engine.history.access import open_log
from engine.history.query import query
from engine.history.reaggregate import reaggregate
from engine.history.verify import verify_log
from engine.history.workflow_replay import replay_workflow

LOGS = Path(__file__).parent / "logs"


def copy_of(tmp_path: Path, name: str) -> Path:
    """The golden folder copied (SQLite may touch its files when opening; the originals stay as recorded)."""
    target = tmp_path / name
    shutil.copytree(LOGS / name, target)
    return target


@pytest.mark.parametrize("name", ["fedavg_crash", "torch_crash", "stream_resume", "nondeterministic"])
def test_every_golden_log_verifies(tmp_path: Path, name: str) -> None:
    folder = copy_of(tmp_path, name)
    for db in sorted(folder.glob("*.db")):
        with open_log(db) as log:
            report = verify_log(log, load_charts())
        assert report.problems == [], (db.name, report.problems[:5])
        assert report.projection_compared and report.events > 0


@pytest.mark.parametrize("name", ["fedavg_crash", "torch_crash"])
def test_the_recorded_workflows_replay_call_for_call(tmp_path: Path, name: str) -> None:
    folder = copy_of(tmp_path, name)
    outcome = replay_workflow(folder / "server.db", "job-1")
    assert outcome.calls > 0
    # the crash left its mark: a round written by two server incarnations
    _, rerun = query(folder / "server.db", "SELECT round FROM rounds WHERE job_id = 'job-1' AND server_runs > 1")
    assert rerun, "the golden log should hold a round that spanned the server's restart"


def test_the_torch_rounds_re_aggregate_to_the_published_hashes(tmp_path: Path) -> None:
    folder = copy_of(tmp_path, "torch_crash")
    with open_log(folder / "server.db") as log, LocalChunkStore(folder / "server.db.chunks") as chunks:
        rounds = sorted({e.round for e in log.read(job_id="job-1") if e.round is not None})
        assert rounds
        for r in rounds:
            assert reaggregate(log, chunks, "job-1", r).matches


def test_the_resumed_stream_is_one_session_in_the_sites_log(tmp_path: Path) -> None:
    folder = copy_of(tmp_path, "stream_resume")
    _, rows = query(folder / "site.db", "SELECT session_id, state, resumes, chunks_resent, chunks_wanted, acks "
                                        "FROM streams WHERE resumes > 0")
    assert rows and all(state == "completed" and resumes >= 1 for _, state, resumes, *_ in rows)
    # what arrived before the kill was found in the store: nothing was acknowledged twice
    assert all(resent == 0 for *_, resent, _, _ in rows)


def test_the_nondeterministic_history_fails_replay(tmp_path: Path) -> None:
    folder = copy_of(tmp_path, "nondeterministic")
    with pytest.raises(NondeterminismError, match="publish"):
        replay_workflow(folder / "server.db", "job-1")


def test_fedlog_replay_workflow_reports_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from engine.cli import main

    good, bad = copy_of(tmp_path, "fedavg_crash"), copy_of(tmp_path, "nondeterministic")
    assert main(["replay", str(good / "server.db"), "--job", "job-1", "--workflow"]) == 0
    assert "replayed 9 recorded calls" in capsys.readouterr().out
    assert main(["replay", str(bad / "server.db"), "--job", "job-1", "--workflow"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("NondeterminismError: ") and "finished_at" in out
