"""Staged appends: written inside an open transaction, durable only at commit_staged."""

from __future__ import annotations

import pytest

from engine.errors import ConcurrencyConflict
from engine.log.sql import SqlRecorder
from tests.log.factory import ev


def test_staged_events_commit_together_and_conflicts_are_known_at_stage(sql_url: str) -> None:
    rec = SqlRecorder(sql_url)
    try:
        first = rec.stage([ev("a", 1), ev("b", 1)])
        assert all(r.error is None for r in first)
        second = rec.stage([ev("a", 2), ev("b", 1)])  # b v1 again: lost inside the open transaction
        assert second[0].error is None
        assert isinstance(second[1].error, ConcurrencyConflict)
        reader = SqlRecorder(sql_url)
        try:
            assert reader.last_seq() == 0  # nothing visible before the commit
            rec.commit_staged()
            assert [(e.machine_id, e.version) for e in reader.read()] == [("a", 1), ("b", 1), ("a", 2)]
            assert reader.get_machine("a").version == 2  # type: ignore[union-attr]
        finally:
            reader.close()
    finally:
        rec.close()


def test_abort_staged_loses_everything_since_the_last_commit(sql_url: str) -> None:
    rec = SqlRecorder(sql_url)
    try:
        rec.append([ev("a", 1)])
        rec.stage([ev("a", 2), ev("b", 1)])
        rec.abort_staged()
        assert [(e.machine_id, e.version) for e in rec.read()] == [("a", 1)]
        assert rec.get_machine("b") is None
        assert rec.get_machine("a").version == 1  # type: ignore[union-attr]
        rec.append([ev("a", 2)])  # the log is usable again
        assert rec.last_seq() >= 2
    finally:
        rec.close()


@pytest.mark.parametrize("count", [1, 3])
def test_commit_with_nothing_staged_is_a_no_op(sql_url: str, count: int) -> None:
    rec = SqlRecorder(sql_url)
    try:
        for _ in range(count):
            rec.commit_staged()
        assert rec.last_seq() == 0
    finally:
        rec.close()
