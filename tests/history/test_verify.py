"""``verify_log`` passes a clean log and names every lie in a hand-corrupted one."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import create_engine, pool, text

from engine.charts.registry import ChartRegistry
from engine.clock import format_us
from engine.errors import LogCorrupted
from engine.history.access import open_log
from engine.history.replay import Until
from engine.history.verify import VerifyReport, verify_log
from engine.log.memory import MemoryRecorder
from engine.log.target import to_url
from tests.history.support import WrittenLog, drive, registry, write_log


def execute(url: str, *statements: str, **params: Any) -> None:
    """Corrupt the log by hand: run ``statements`` in one transaction."""
    engine = create_engine(to_url(url), poolclass=pool.NullPool)
    try:
        with engine.begin() as conn:
            for statement in statements:
                conn.execute(text(statement), params)
    finally:
        engine.dispose()


def seq_of(url: str, machine_id: str, version: int) -> int:
    engine = create_engine(to_url(url), poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            return int(conn.execute(
                text("SELECT seq FROM events WHERE machine_id = :m AND version = :v"),
                {"m": machine_id, "v": version},
            ).scalar_one())
    finally:
        engine.dispose()


def insert_event(url: str, machine_id: str, kind: str, version: int, trigger: str,
                 source: str | None, dest: str, chart_version: int = 1) -> int:
    execute(
        url,
        "INSERT INTO events (machine_id, kind, chart_version, version, trigger, source, dest, "
        "job_id, ts_us, writer) VALUES (:m, :k, :cv, :v, :t, :s, :d, 'J1', 1800000000000000, 'hand')",
        m=machine_id, k=kind, cv=chart_version, v=version, t=trigger, s=source, d=dest,
    )
    return seq_of(url, machine_id, version)


def check(url: str, charts: ChartRegistry | None = None, **kwargs: Any) -> VerifyReport:
    with open_log(url) as log:
        return verify_log(log, charts or registry(), **kwargs)


def problems(url: str, charts: ChartRegistry | None = None, **kwargs: Any) -> list[str]:
    return [str(p) for p in check(url, charts, **kwargs).problems]


@pytest.fixture
def log_url(sql_url: str) -> str:
    write_log(sql_url)
    return sql_url


def test_clean_log_verifies(sql_url: str) -> None:
    written: WrittenLog = write_log(sql_url)
    report = check(sql_url)
    assert report.problems == []
    assert report.ok and report.projection_compared
    assert report.events == written.final.seq == report.last_seq
    assert report.states == written.final.states
    report.raise_if_corrupted()  # nothing to raise


def test_clean_memory_log_verifies() -> None:
    recorder = MemoryRecorder()
    written = drive(recorder)
    report = verify_log(recorder, registry())
    assert report.problems == [] and report.states == written.final.states


def test_changed_destination(log_url: str) -> None:
    s2, s3 = seq_of(log_url, "job-1", 2), seq_of(log_url, "job-1", 3)
    execute(log_url, "UPDATE events SET dest = 'running' WHERE machine_id = 'job-1' AND version = 2")
    assert problems(log_url) == [
        f"seq {s2}: job 'job-1' v2: trigger 'deploy' from 'submitted' leads to 'deploying' in "
        "job chart v1, but the event enters 'running'",
        f"seq {s3}: job 'job-1' v3: source state 'deploying' is not the machine's state: the "
        "events before it fold to 'running' (version 2)",
    ]


def test_deleted_event_in_the_middle(log_url: str) -> None:
    s4 = seq_of(log_url, "job-1", 4)
    execute(log_url, "DELETE FROM events WHERE machine_id = 'job-1' AND version = 3")
    assert problems(log_url) == [
        f"seq {s4}: job 'job-1' v4: version gap: expected version 3 after version 2, found 4 "
        "(version 3 missing)",
        f"seq {s4}: job 'job-1' v4: source state 'running' is not the machine's state: the "
        "events before it fold to 'deploying' (version 2)",
    ]


def test_deleted_create_event(log_url: str) -> None:
    s2 = seq_of(log_url, "job-2", 2)
    execute(log_url, "DELETE FROM events WHERE machine_id = 'job-2' AND version = 1")
    assert problems(log_url) == [
        f"seq {s2}: job 'job-2' v2: first event of the machine has version 2, expected 1 (version 1 missing)",
    ]


def test_deleted_last_event_disagrees_with_projection(log_url: str) -> None:
    s1 = seq_of(log_url, "job-2", 1)
    with open_log(log_url) as log:
        row = log.get_machine("job-2")
    assert row is not None and row.deadline_us is not None
    execute(log_url, "DELETE FROM events WHERE machine_id = 'job-2' AND version = 2")
    assert problems(log_url) == [
        f"projection: job 'job-2' v1: machine_states disagrees with the events (last event: seq {s1}): "
        "state: machine_states has 'deploying', the events fold to 'submitted'; "
        "version: machine_states has 2, the events fold to 1; "
        f"deadline_us: machine_states has {format_us(row.deadline_us)} ({row.deadline_us}), "
        "the events fold to none",
    ]


def test_edited_projection(log_url: str) -> None:
    s1 = seq_of(log_url, "job-4", 1)
    execute(log_url, "UPDATE machine_states SET state = 'running', round = 9 WHERE machine_id = 'job-4'")
    assert problems(log_url) == [
        f"projection: job 'job-4' v1: machine_states disagrees with the events (last event: seq {s1}): "
        "state: machine_states has 'running', the events fold to 'submitted'; "
        "round: machine_states has 9, the events fold to None",
    ]


def test_projection_row_missing_or_extra(log_url: str) -> None:
    s2 = seq_of(log_url, "job-3", 2)
    execute(
        log_url,
        "DELETE FROM machine_states WHERE machine_id = 'job-3'",
        "INSERT INTO machine_states (machine_id, kind, chart_version, state, version, terminal, "
        "created_us, updated_us) VALUES ('ghost', 'job', 1, 'running', 3, false, 1, 1)",
    )
    assert sorted(problems(log_url)) == sorted([
        "projection: job 'ghost' v3: machine_states has this machine (state 'running', version 3) "
        "but the log has no events for it",
        f"projection: job 'job-3' v2: the events (last: seq {s2}) fold to state 'aborted' at "
        "version 2, but machine_states has no row for this machine",
    ])


def test_illegal_trigger(log_url: str) -> None:
    seq = insert_event(log_url, "job-2", "job", 3, "finish", "deploying", "finished")
    found = problems(log_url)
    assert found[0] == (
        f"seq {seq}: job 'job-2' v3: trigger 'finish' is not legal in state 'deploying' of job "
        "chart v1 (legal there: abort, fail, start, timeout)"
    )
    # the projection was not told about the forged event either
    assert len(found) == 2 and found[1].startswith("projection: job 'job-2' v3: machine_states disagrees")
    assert "version: machine_states has 2, the events fold to 3" in found[1]


def test_event_after_terminal_state(log_url: str) -> None:
    seq = insert_event(log_url, "job-3", "job", 3, "abort", "aborted", "aborted")
    found = problems(log_url)
    assert found[:2] == [
        f"seq {seq}: job 'job-3' v3: event after the terminal state 'aborted' (reached at version 2): "
        "a terminal machine takes no more events",
        f"seq {seq}: job 'job-3' v3: trigger 'abort' is not legal in state 'aborted' of job chart v1 "
        "(legal there: none (terminal state))",
    ]
    assert len(found) == 3 and found[2].startswith("projection: job 'job-3' v3")


def test_bad_create_event(log_url: str) -> None:
    s1 = seq_of(log_url, "job-4", 1)
    execute(log_url, "UPDATE events SET dest = 'deploying', source = 'submitted', trigger = 'deploy' "
                     "WHERE machine_id = 'job-4' AND version = 1")
    found = problems(log_url)
    assert found[:3] == [
        f"seq {s1}: job 'job-4' v1: version 1 must be the 'create' event, found trigger 'deploy'",
        f"seq {s1}: job 'job-4' v1: the 'create' event must have no source state, found 'submitted'",
        f"seq {s1}: job 'job-4' v1: the 'create' event must enter job v1's initial state "
        "'submitted', found 'deploying'",
    ]
    assert len(found) == 4 and "state: machine_states has 'submitted', the events fold to 'deploying'" in found[3]


def test_second_create_and_version_jump(log_url: str) -> None:
    s3 = seq_of(log_url, "gauge-c", 3)
    execute(log_url, "UPDATE events SET version = 7 WHERE machine_id = 'gauge-c' AND version = 3")
    seq = insert_event(log_url, "job-4", "job", 2, "create", None, "submitted")
    found = problems(log_url)
    assert found[0] == (
        f"seq {s3}: gauge 'gauge-c' v7: version gap: expected version 3 after version 2, found 7 "
        "(version 3..6 missing)"
    )
    assert f"seq {seq}: job 'job-4' v2: source state None is not the machine's state: the events " \
           "before it fold to 'submitted' (version 1)" in found
    assert f"seq {seq}: job 'job-4' v2: 'create' event for a machine that already exists (at version 1)" in found
    assert any(p.startswith("projection: gauge 'gauge-c' v7") and "version: machine_states has 3, "
               "the events fold to 7" in p for p in found)


def test_unknown_chart_version(log_url: str) -> None:
    s1 = seq_of(log_url, "job-4", 1)
    execute(log_url, "UPDATE events SET chart_version = 7 WHERE machine_id = 'job-4'")
    assert problems(log_url) == [
        f"seq {s1}: job 'job-4' v1: written under job chart version 7, which is unknown (loaded job "
        "chart versions: 1); its events cannot be checked",
        f"projection: job 'job-4' v1: machine_states disagrees with the events (last event: seq {s1}): "
        "chart_version: machine_states has 1, the events fold to 7",
    ]


def test_unknown_kind(log_url: str) -> None:
    s1 = insert_event(log_url, "alien", "ufo", 1, "create", None, "landed")
    s2 = insert_event(log_url, "alien", "ufo", 2, "leave", "landed", "gone")
    assert problems(log_url) == [
        f"seq {s1}: ufo 'alien' v1: written under ufo chart version 1, which is unknown (no 'ufo' "
        "chart is loaded; loaded kinds: gauge, job); its events cannot be checked",
        f"projection: ufo 'alien' v2: the events (last: seq {s2}) fold to state 'gone' at version 2, "
        "but machine_states has no row for this machine",
    ]


def test_each_event_is_checked_under_its_own_chart_version(log_url: str) -> None:
    # gauge-a's "rest" was written under v1, where it is legal; v2 renamed it "pause"
    rest = seq_of(log_url, "gauge-a", 3)
    assert problems(log_url) == []
    # without v1, its v1 events cannot be checked (reported once per machine, not per event)
    found = problems(log_url, registry(2))
    assert found == [
        f"seq {seq_of(log_url, 'gauge-a', 1)}: gauge 'gauge-a' v1: written under gauge chart version 1, "
        "which is unknown (loaded gauge chart versions: 2); its events cannot be checked",
    ]
    # claiming the v1 event was written under v2 makes it illegal
    execute(log_url, "UPDATE events SET chart_version = 2 WHERE seq = :s", s=rest)
    assert problems(log_url) == [
        f"seq {rest}: gauge 'gauge-a' v3: trigger 'rest' is not legal in state 'measuring' of gauge "
        "chart v2 (legal there: finish, pause, timeout)",
    ]


def test_all_problems_are_collected_and_raised(log_url: str) -> None:
    execute(
        log_url,
        "UPDATE events SET dest = 'running' WHERE machine_id = 'job-1' AND version = 2",
        "DELETE FROM events WHERE machine_id = 'job-2' AND version = 2",
        "UPDATE machine_states SET state = 'running' WHERE machine_id = 'job-4'",
        "UPDATE events SET chart_version = 9 WHERE machine_id = 'gauge-b'",
    )
    report = check(log_url)
    machines = [p.machine_id for p in report.problems]
    assert set(machines) == {"job-1", "job-2", "job-4", "gauge-b"}
    event_seqs = [p.seq for p in report.problems if p.seq is not None]
    assert event_seqs == sorted(event_seqs)  # log order
    with pytest.raises(LogCorrupted) as caught:
        report.raise_if_corrupted()
    assert caught.value.problems == [str(p) for p in report.problems]
    assert str(caught.value).startswith(f"{len(report.problems)} problem(s) in the log:")


def test_until_checks_events_up_to_that_point_only(log_url: str) -> None:
    s2 = seq_of(log_url, "job-1", 2)
    finish = seq_of(log_url, "job-1", 4)
    execute(log_url, "UPDATE events SET trigger = 'explode' WHERE seq = :s", s=finish)
    early = check(log_url, until=Until(seq=finish - 1))
    assert early.problems == [] and not early.projection_compared
    assert early.states["job-1"].state == "running"
    late = check(log_url, until=Until(seq=finish))
    assert [p.seq for p in late.problems] == [finish]
    assert check(log_url, until=Until(seq=s2)).events == s2


def test_one_machine(log_url: str) -> None:
    execute(log_url, "UPDATE machine_states SET version = 99 WHERE machine_id = 'job-4'")
    report = check(log_url, machine_id="job-1")
    assert report.problems == [] and list(report.states) == ["job-1"]
    found = problems(log_url, machine_id="job-4")
    assert len(found) == 1 and "version: machine_states has 99, the events fold to 1" in found[0]
    # a projection row without events is found for a single machine too
    execute(log_url, "DELETE FROM events WHERE machine_id = 'job-4'")
    assert problems(log_url, machine_id="job-4") == [
        "projection: job 'job-4' v99: machine_states has this machine (state 'submitted', version 99) "
        "but the log has no events for it",
    ]
