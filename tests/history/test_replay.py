"""Folding the log rebuilds exactly the states the live runtime had, at any point."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.charts.registry import ChartRegistry
from engine.clock import format_us
from engine.errors import ChartError, ConfigError, SchemaError
from engine.history import replay as replay_module
from engine.history.access import open_log
from engine.history.replay import Until, fold, parse_until
from engine.log import migrate
from engine.log.memory import MemoryRecorder
from engine.log.recorder import EventRecorder
from engine.machines.state import MachineState
from tests.history.support import drive, job_chart, registry, write_log


def test_fold_equals_runtime_and_projection(sql_url: str) -> None:
    written = write_log(sql_url)
    with open_log(sql_url) as log:
        result = fold(log, registry())
        projection = {row.machine_id: MachineState.from_row(row) for row in log.machines()}
        assert result.last_seq == log.last_seq()
    assert result.events == written.final.seq
    assert list(result.states) == written.machines  # creation order
    assert result.states == written.final.states
    assert result.states == projection
    # the interesting bits really are there (so the equalities above compare something)
    assert result.states["job-1"].state == "finished" and result.states["job-1"].terminal
    assert result.states["job-2"].deadline_us is not None
    assert result.states["gauge-a"].round == 2 and result.states["gauge-a"].site == "a"
    assert result.states["gauge-a"].chart_version == 2
    assert result.states["gauge-c"].state == "lost"


def test_fold_memory_recorder() -> None:
    recorder = MemoryRecorder()
    written = drive(recorder)
    result = fold(recorder, registry())
    assert result.states == written.final.states
    assert result.events == recorder.last_seq()


@pytest.mark.parametrize("backend", ["sqlite", "memory"])
def test_fold_until_seq_matches_every_snapshot(backend: str, tmp_path: Path) -> None:
    log: EventRecorder
    if backend == "memory":
        log = MemoryRecorder()
        written = drive(log)
    else:
        written = write_log(str(tmp_path / "log.db"))
        log = open_log(tmp_path / "log.db")
    charts = registry()
    with log:
        for snap in written.snapshots:
            result = fold(log, charts, until=Until(seq=snap.seq))
            assert result.states == snap.states, f"at seq {snap.seq}"
            assert result.events == snap.seq
        # seq 0 folds nothing; a seq past the end folds everything
        assert fold(log, charts, until=Until(seq=0)).states == {}
        assert fold(log, charts, until=Until(seq=10**9)).states == written.final.states


def test_fold_until_time(sql_url: str) -> None:
    written = write_log(sql_url)
    charts = registry()
    with open_log(sql_url) as log:
        for snap in written.snapshots[::3]:
            assert fold(log, charts, until=Until(ts_us=snap.ts_us)).states == snap.states
        # a time between two events: the earlier snapshot's states
        snap = written.snapshots[5]
        assert fold(log, charts, until=Until(ts_us=snap.ts_us + 500_000)).states == snap.states
        first = written.snapshots[0]
        assert fold(log, charts, until=Until(ts_us=first.ts_us - 1)).states == {}


def test_fold_one_machine(sql_url: str) -> None:
    written = write_log(sql_url)
    with open_log(sql_url) as log:
        result = fold(log, registry(), machine_id="gauge-a")
        assert result.states == {"gauge-a": written.final.states["gauge-a"]}
        events = [e for e in log.read() if e.machine_id == "gauge-a"]
        assert result.events == len(events) == 5
        assert result.last_seq == events[-1].seq
        assert fold(log, registry(), machine_id="nobody").states == {}


def test_fold_reports_progress(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written = write_log(str(tmp_path / "log.db"))
    monkeypatch.setattr(replay_module, "CHUNK_ROWS", 4)
    calls: list[tuple[int, int]] = []
    with open_log(tmp_path / "log.db") as log:
        result = fold(log, registry(), progress=lambda n, seq: calls.append((n, seq)))
    total = written.final.seq
    assert [n for n, _ in calls] == [*range(4, total, 4), total]
    assert calls[-1] == (total, result.last_seq)


def test_fold_unknown_chart_version_names_the_event(tmp_path: Path) -> None:
    write_log(str(tmp_path / "log.db"))
    with open_log(tmp_path / "log.db") as log:
        first_v2 = next(e for e in log.read() if e.kind == "gauge" and e.chart_version == 2)
        with pytest.raises(ChartError) as caught:
            fold(log, registry(1))
    message = str(caught.value)
    assert f"event seq {first_v2.seq} of machine {first_v2.machine_id!r}" in message
    assert "gauge version 2" in message and "--charts" in message


def test_fold_unknown_kind(tmp_path: Path) -> None:
    write_log(str(tmp_path / "log.db"))
    with open_log(tmp_path / "log.db") as log, pytest.raises(ChartError, match="no statechart for gauge"):
        fold(log, ChartRegistry([job_chart()]))


def test_fold_leaves_gc_as_it_was(tmp_path: Path) -> None:
    import gc

    write_log(str(tmp_path / "log.db"))
    with open_log(tmp_path / "log.db") as log:
        assert gc.isenabled()
        fold(log, registry())
        assert gc.isenabled()
        with pytest.raises(ChartError):
            fold(log, registry(1))
        assert gc.isenabled()
        gc.disable()
        try:
            fold(log, registry())
            assert not gc.isenabled()
        finally:
            gc.enable()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", Until(seq=0)),
        ("1200", Until(seq=1200)),
        (" 7 ", Until(seq=7)),
        ("2023-11-14T22:13:20Z", Until(ts_us=1_700_000_000_000_000)),
        ("2023-11-14T22:13:20.000250Z", Until(ts_us=1_700_000_000_000_250)),
        ("2023-11-14T23:13:20+01:00", Until(ts_us=1_700_000_000_000_000)),
        ("2023-11-14 22:13:20", Until(ts_us=1_700_000_000_000_000)),  # naive means UTC
    ],
)
def test_parse_until(text: str, expected: Until) -> None:
    assert parse_until(text) == expected


@pytest.mark.parametrize("text", ["yesterday", "12abc", "2023-13-01T00:00:00", "1.5", ""])
def test_parse_until_rejects_garbage(text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_until(text)
    message = str(caught.value)
    assert f"--until {text!r}" in message
    assert "sequence number" in message and "ISO 8601" in message


def test_parse_until_rejects_negative_seq() -> None:
    with pytest.raises(ConfigError, match="cannot be negative"):
        parse_until("-3")


def test_until_prints_as_seq_or_time() -> None:
    assert str(Until(seq=5)) == "seq 5"
    assert str(Until(ts_us=1_700_000_000_000_000)) == format_us(1_700_000_000_000_000)


def test_open_log_refuses_missing_file_and_creates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "absent.db"
    with pytest.raises(ConfigError, match="no such database"):
        open_log(path)
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_open_log_does_not_upgrade_an_old_schema(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    migrate.upgrade(str(path), "0001")
    with pytest.raises(SchemaError, match=r"run: fedlog db upgrade"):
        open_log(path)
    assert migrate.status(str(path)).current == "0001"


def test_open_log_refuses_a_database_without_fedlog_schema(tmp_path: Path, sql_url: str) -> None:
    if "://" not in sql_url:
        Path(sql_url).write_bytes(b"")  # an existing, empty file
    with pytest.raises(SchemaError, match="is not a fedlog event log"):
        open_log(sql_url)
    assert migrate.status(sql_url).current is None
