"""The EventRecorder contract, run against every backend (memory, SQLite, PostgreSQL).

Every test opens its log with ``open_recorder(backend_url)``, so the three
implementations must agree on every observable: sequence numbers, projection rows,
conflicts (and that a conflict writes nothing), read filters, timers and data.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import fields, replace
from typing import Any

import pytest

from engine.errors import ConcurrencyConflict, StoreError
from engine.log.recorder import EventRecorder, MachineRow, NewEvent, StoredEvent, stored_from_new
from engine.log.sql import open_recorder
from tests.log.factory import T0, chain, ev


@pytest.fixture
def rec(backend_url: str) -> Iterator[EventRecorder]:
    recorder = open_recorder(backend_url)
    try:
        yield recorder
    finally:
        recorder.close()


def snapshot(rec: EventRecorder) -> tuple[Any, ...]:
    """Everything a reader can observe, to prove an operation changed nothing."""
    return list(rec.read()), rec.machines(), rec.timers(), rec.last_seq()


def append_ok(rec: EventRecorder, batch: list[NewEvent]) -> list[int]:
    results = rec.append(batch)
    assert [r.error for r in results] == [None] * len(batch)
    return [r.seq for r in results]  # type: ignore[misc]


# -- appending ------------------------------------------------------------------------


def test_empty_log(rec: EventRecorder) -> None:
    assert rec.last_seq() == 0
    assert list(rec.read()) == []
    assert rec.machines() == []
    assert rec.timers() == []
    assert rec.get_machine("nope") is None
    assert rec.append([]) == []


def test_append_one_returns_the_stored_event(rec: EventRecorder) -> None:
    event = ev("m1", 1, "submitted", job_id="j1", round=0, site="site-a", data={"k": "v"},
               deadline_us=T0 + 10_000_000)
    stored = rec.append_one(event)
    assert stored == stored_from_new(event, 1)
    assert list(rec.read()) == [stored]
    assert rec.last_seq() == 1


def test_batch_gets_consecutive_seqs_in_batch_order(rec: EventRecorder) -> None:
    first = append_ok(rec, [ev("a", 1), ev("b", 1)])
    batch = [ev("c", 1), ev("a", 2, "s2"), ev("b", 2, "s2"), ev("c", 2, "s2"), ev("a", 3, "s3")]
    seqs = append_ok(rec, batch)
    assert first == [1, 2]
    assert seqs == [3, 4, 5, 6, 7]
    assert list(rec.read(after_seq=2)) == [stored_from_new(e, s) for e, s in zip(batch, seqs, strict=True)]


def test_several_versions_of_one_new_machine_in_one_batch(rec: EventRecorder) -> None:
    append_ok(rec, chain("m", 4))
    row = rec.get_machine("m")
    assert row is not None and (row.version, row.state) == (4, "s4")
    assert [e.version for e in rec.read(machine_id="m")] == [1, 2, 3, 4]


def test_seq_is_gap_free_across_batches_and_conflicts(rec: EventRecorder) -> None:
    expected: list[StoredEvent] = []

    def run(batch: list[NewEvent]) -> None:
        for event, result in zip(batch, rec.append(batch), strict=True):
            if result.error is None:
                assert result.seq is not None
                expected.append(stored_from_new(event, result.seq))

    run(chain("a", 3))
    run([ev("b", 1), ev("a", 3, "x"), ev("c", 1)])  # a@3 is stale
    run([ev("a", 9, "x")])  # a gap: rejected alone
    run([ev("b", 2, "s2"), ev("a", 4, "s4"), ev("b", 2, "dup")])
    run([ev(f"n{i:04d}", 1) for i in range(5200)])  # longer than one fetch of the SQL reader
    seqs = [e.seq for e in expected]
    assert seqs == list(range(1, len(expected) + 1))
    assert list(rec.read()) == expected
    assert rec.last_seq() == len(expected)
    assert [e.seq for e in rec.read(after_seq=5000, limit=3)] == [5001, 5002, 5003]


# -- projection -----------------------------------------------------------------------


def test_projection_is_what_the_events_imply(rec: EventRecorder) -> None:
    rec.append_one(ev("m", 1, "submitted", kind="task", chart_version=2, job_id="j1", round=0,
                      site="site-a", deadline_us=T0 + 60_000_000, ts_us=T0))
    row = rec.get_machine("m")
    assert row == MachineRow("m", "task", 2, "submitted", 1, False, T0 + 60_000_000, "j1", 0, "site-a",
                             T0, T0)
    # later events: no job/site (as the runtime writes them), a new round, a new deadline
    rec.append_one(ev("m", 2, "running", kind="task", chart_version=2, round=1,
                      deadline_us=T0 + 90_000_000, ts_us=T0 + 7))
    rec.append_one(ev("m", 3, "waiting", kind="task", chart_version=3, ts_us=T0 + 9))
    row = rec.get_machine("m")
    assert row == MachineRow("m", "task", 3, "waiting", 3, False, None, "j1", 1, "site-a", T0, T0 + 9)
    rec.append_one(ev("m", 4, "done", kind="task", chart_version=3, terminal=True, ts_us=T0 + 12))
    row = rec.get_machine("m")
    assert row == MachineRow("m", "task", 3, "done", 4, True, None, "j1", 1, "site-a", T0, T0 + 12)
    assert rec.machines() == [row]


def test_job_and_site_are_fixed_by_the_first_event(rec: EventRecorder) -> None:
    rec.append_one(ev("m", 1, job_id="j1", site="site-a", round=3))
    rec.append_one(ev("m", 2, "s2", job_id="j2", site="site-b"))
    row = rec.get_machine("m")
    assert row is not None
    assert (row.job_id, row.site, row.round) == ("j1", "site-a", 3)
    assert [m.machine_id for m in rec.machines(job_id="j1")] == ["m"]
    assert rec.machines(job_id="j2") == []


# -- conflicts ------------------------------------------------------------------------


def assert_conflict(error: BaseException | None, machine_id: str, expected: int, actual: int) -> None:
    assert isinstance(error, ConcurrencyConflict)
    assert (error.machine_id, error.expected, error.actual) == (machine_id, expected, actual)
    assert repr(machine_id) in str(error) and "nothing was written" in str(error)


@pytest.mark.parametrize(
    ("version", "expected", "actual"),
    [(2, 1, 2), (1, 0, 2), (4, 3, 2), (100, 99, 2)],
    ids=["stale", "duplicate-create", "gap", "far-gap"],
)
def test_wrong_expected_version_conflicts_and_writes_nothing(
    rec: EventRecorder, version: int, expected: int, actual: int
) -> None:
    append_ok(rec, chain("m", 2, deadline_us=T0 + 5))
    before = snapshot(rec)
    with pytest.raises(ConcurrencyConflict) as info:
        rec.append_one(ev("m", version, "elsewhere", data={"x": 1}, deadline_us=T0 + 99))
    assert_conflict(info.value, "m", expected, actual)
    assert info.value.reason is None
    assert snapshot(rec) == before


def test_first_event_of_a_machine_must_be_version_1(rec: EventRecorder) -> None:
    with pytest.raises(ConcurrencyConflict) as info:
        rec.append_one(ev("ghost", 2, "s2"))
    assert_conflict(info.value, "ghost", 1, 0)
    assert rec.get_machine("ghost") is None
    assert snapshot(rec) == ([], [], [], 0)


def test_conflict_inside_a_batch_drops_only_the_loser(rec: EventRecorder) -> None:
    append_ok(rec, [ev("a", 1, "s1"), ev("z", 1, "s1")])
    before_a = (rec.get_machine("a"), list(rec.read(machine_id="a")))
    batch = [ev("b", 1), ev("a", 1, "other"), ev("z", 2, "s2"), ev("c", 1)]
    results = rec.append(batch)
    assert [r.seq for r in results] == [3, None, 4, 5]
    assert_conflict(results[1].error, "a", 0, 1)
    assert (rec.get_machine("a"), list(rec.read(machine_id="a"))) == before_a
    assert [e.machine_id for e in rec.read()] == ["a", "z", "b", "z", "c"]
    assert rec.last_seq() == 5


def test_events_after_a_rejected_one_of_the_same_machine_are_rejected(rec: EventRecorder) -> None:
    append_ok(rec, [ev("a", 1, "s1")])
    before = rec.get_machine("a")
    # another writer's create lost: its follow-up was planned on top of it and must not land
    batch = [ev("a", 1, "theirs", writer="w2"), ev("a", 2, "theirs2", writer="w2"), ev("b", 1)]
    results = rec.append(batch)
    assert_conflict(results[0].error, "a", 0, 1)
    assert results[0].error is not None and results[0].error.reason is None
    chained = results[1].error
    assert_conflict(chained, "a", 1, 1)
    assert isinstance(chained, ConcurrencyConflict) and chained.reason is not None
    assert "earlier event of this machine in the same batch was rejected" in str(chained)
    assert "expected to append after version 1, but the log holds version 1" not in str(chained)
    assert results[2].seq == 2 and results[2].error is None
    assert rec.get_machine("a") == before
    assert [e.writer for e in rec.read(machine_id="a")] == ["test"]


def test_duplicate_event_within_one_batch(rec: EventRecorder) -> None:
    append_ok(rec, [ev("a", 1, "s1")])
    results = rec.append([ev("a", 2, "s2"), ev("a", 2, "again")])
    assert results[0].error is None and results[0].seq == 2
    assert_conflict(results[1].error, "a", 1, 2)
    row = rec.get_machine("a")
    assert row is not None and (row.version, row.state) == (2, "s2")


@pytest.mark.parametrize(
    "data",
    [{"too_big": 2**64}, {"too_small": -(2**63) - 1}, {1: "non-string key"}],
    ids=["int>64bit", "int<-2^63", "int-key"],
)
def test_data_json_cannot_hold_fails_the_batch_and_writes_nothing(
    rec: EventRecorder, data: dict[Any, Any]
) -> None:
    append_ok(rec, [ev("a", 1)])
    before = snapshot(rec)
    with pytest.raises(StoreError):
        rec.append([ev("b", 1), ev("a", 2, "s2", data=data)])
    assert snapshot(rec) == before
    append_ok(rec, [ev("b", 1)])  # the log still works


# -- reads ----------------------------------------------------------------------------


@pytest.fixture
def history(rec: EventRecorder) -> list[StoredEvent]:
    """A small interleaved log: two jobs, times not monotonic in seq."""
    times = [50, 10, 40, 20, 60, 30, 70, 15]
    batch = [
        ev("a", 1, job_id="j1"), ev("b", 1, job_id="j2"), ev("a", 2, "s2"), ev("c", 1, job_id="j1"),
        ev("b", 2, "s2"), ev("a", 3, "s3"), ev("c", 2, "s2"), ev("d", 1),
    ]
    batch = [replace(e, ts_us=T0 + t, data={"i": i}) for i, (e, t) in enumerate(zip(batch, times, strict=True))]
    seqs = append_ok(rec, batch)
    # job_id is what each event carries (read filters events, not machines)
    return [stored_from_new(e, s) for e, s in zip(batch, seqs, strict=True)]


READ_FILTERS: list[dict[str, Any]] = [
    {},
    {"machine_id": "a"},
    {"machine_id": "nope"},
    {"job_id": "j1"},
    {"job_id": "j2", "machine_id": "b"},
    {"after_seq": 3},
    {"after_seq": 8},
    {"until_seq": 4},
    {"after_seq": 2, "until_seq": 6},
    {"until_us": T0 + 30},
    {"until_us": T0 + 30, "machine_id": "a"},
    {"limit": 3},
    {"limit": 0},
    {"machine_id": "a", "after_seq": 1, "limit": 1},
    {"job_id": "j1", "until_us": T0 + 45, "limit": 5},
    {"after_seq": 1, "until_seq": 7, "until_us": T0 + 40, "limit": 2},
]


def _expected(events: list[StoredEvent], f: dict[str, Any]) -> list[StoredEvent]:
    out = [
        e for e in events
        if ("machine_id" not in f or e.machine_id == f["machine_id"])
        and ("job_id" not in f or e.job_id == f["job_id"])
        and e.seq > f.get("after_seq", 0)
        and ("until_seq" not in f or e.seq <= f["until_seq"])
        and ("until_us" not in f or e.ts_us <= f["until_us"])
    ]
    return out[: f["limit"]] if "limit" in f else out


@pytest.mark.parametrize("filters", READ_FILTERS, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()) or "all")
def test_read_filters_and_order(rec: EventRecorder, history: list[StoredEvent], filters: dict[str, Any]) -> None:
    got = list(rec.read(**filters))
    assert got == _expected(history, filters)
    assert [e.seq for e in got] == sorted(e.seq for e in got)


def test_read_without_data(rec: EventRecorder, history: list[StoredEvent]) -> None:
    got = list(rec.read(with_data=False))
    assert all(e.data is None for e in got)
    assert [_strip(e) for e in got] == [_strip(e) for e in history]
    assert [e.data for e in rec.read(machine_id="a")] == [{"i": 0}, {"i": 2}, {"i": 5}]


def _strip(e: StoredEvent) -> tuple[Any, ...]:
    return tuple(getattr(e, f.name) for f in fields(e) if f.name != "data")


# -- machines and timers ---------------------------------------------------------------


@pytest.fixture
def fleet(rec: EventRecorder) -> None:
    append_ok(rec, [
        ev("t2", 1, kind="task", job_id="j1", deadline_us=T0 + 300),
        ev("t1", 1, kind="task", job_id="j1", deadline_us=T0 + 100),
        ev("j1", 1, kind="job", job_id="j1"),
        ev("t3", 1, kind="task", job_id="j2", deadline_us=T0 + 100),
        ev("t4", 1, kind="task", job_id="j2", deadline_us=T0 + 50),
        ev("s1", 1, kind="site"),
    ])
    append_ok(rec, [
        ev("t2", 2, "done", kind="task", terminal=True, deadline_us=T0 + 200),  # terminal: no timer
        ev("t4", 2, "s2", kind="task"),  # deadline cleared
        ev("t3", 2, "s2", kind="task", deadline_us=T0 + 100),  # re-armed, same deadline as t1
    ])


@pytest.mark.usefixtures("fleet")
@pytest.mark.parametrize(
    ("query", "ids"),
    [
        ({}, ["j1", "s1", "t1", "t2", "t3", "t4"]),
        ({"kind": "task"}, ["t1", "t2", "t3", "t4"]),
        ({"live_only": True}, ["j1", "s1", "t1", "t3", "t4"]),
        ({"kind": "task", "live_only": True}, ["t1", "t3", "t4"]),
        ({"job_id": "j1"}, ["j1", "t1", "t2"]),
        ({"job_id": "j1", "live_only": True, "kind": "task"}, ["t1"]),
        ({"kind": "stream_send"}, []),
    ],
)
def test_machines_filters(rec: EventRecorder, query: dict[str, Any], ids: list[str]) -> None:
    rows = rec.machines(**query)
    assert [r.machine_id for r in rows] == ids
    assert all(r == rec.get_machine(r.machine_id) for r in rows)


@pytest.mark.usefixtures("fleet")
def test_timers_are_armed_deadlines_of_live_machines(rec: EventRecorder) -> None:
    assert rec.timers() == [(T0 + 100, "t1", 1), (T0 + 100, "t3", 2)]


def test_last_seq_follows_appends(rec: EventRecorder) -> None:
    for n in range(1, 4):
        rec.append_one(ev(f"m{n}", 1))
        assert rec.last_seq() == n
    rec.append([ev("m1", 1)])  # a conflict does not move it
    assert rec.last_seq() == 3


# -- values round-trip exactly ---------------------------------------------------------

JSON_VALUES: list[Any] = [
    {"text": "héllo wörld — ünïcode ✓ 日本語 😀 \u2028 \x00 \"quoted\" \\ back"},
    {"nested": {"a": [1, {"b": [None, True, False, {"c": []}]}, {}], "d": {"e": {"f": "g"}}}},
    {"ints": [0, -1, 2**31, 2**53 + 1, 2**63 - 1, -(2**63), 2**64 - 1]},
    {"floats": [0.1, -0.0, 1.5e-7, 5e-324, 1e16, 1e20, 1e308, 2.0, 123456789.12345679, math.pi]},
    {"empty": {}, "list": [], "s": ""},
    {"deep": [[[[[[[[[["x"]]]]]]]]]]},
    {"k" * 60: "v" * 10_000},
]


@pytest.mark.parametrize("data", JSON_VALUES, ids=["unicode", "nested", "ints", "floats", "empty", "deep", "long"])
def test_json_data_round_trips(rec: EventRecorder, data: dict[str, Any]) -> None:
    rec.append_one(ev("m", 1, data=data))
    (got,) = rec.read()
    assert got.data == data
    assert _types(got.data) == _types(data)  # 1e20 stays a float, -0.0 keeps its sign
    assert [e.data for e in rec.read(machine_id="m")] == [data]


def _types(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _types(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_types(v) for v in value]
    if isinstance(value, float):
        return ("float", math.copysign(1.0, value))
    return type(value).__name__


def test_data_is_a_snapshot_of_what_was_appended(rec: EventRecorder) -> None:
    data = {"a": [1, 2]}
    rec.append_one(ev("m", 1, data=data))
    data["a"].append(3)
    data["b"] = 1
    assert [e.data for e in rec.read()] == [{"a": [1, 2]}]


def test_tuples_come_back_as_lists(rec: EventRecorder) -> None:
    rec.append_one(ev("m", 1, data={"t": (1, "x")}))
    assert [e.data for e in rec.read()] == [{"t": [1, "x"]}]


@pytest.mark.parametrize(
    "ts_us", [0, 1, T0, 1_700_000_000_999_999, 4_102_444_800_000_001, 253_402_300_799_999_999],
    ids=["epoch", "1us", "T0", "x.999999", "2100", "9999-12-31"],
)
def test_microsecond_timestamps_are_exact(rec: EventRecorder, ts_us: int) -> None:
    rec.append_one(ev("m", 1, ts_us=ts_us, deadline_us=ts_us + 1))
    rec.append_one(ev("m", 2, "s2", ts_us=ts_us + 3, deadline_us=ts_us + 999_999))
    got = list(rec.read())
    assert [(e.ts_us, e.deadline_us) for e in got] == [(ts_us, ts_us + 1), (ts_us + 3, ts_us + 999_999)]
    row = rec.get_machine("m")
    assert row is not None
    assert (row.created_us, row.updated_us, row.deadline_us) == (ts_us, ts_us + 3, ts_us + 999_999)
    assert rec.timers() == [(ts_us + 999_999, "m", 2)]
    assert list(rec.read(until_us=ts_us + 2)) == got[:1]
