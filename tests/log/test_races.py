"""Two writers without a lease, racing on one SQL log from two threads.

Each round both writers append the same version of one machine at the same moment
(a barrier releases them together), so every round is a real race. Exactly one
must win it, the other must get a ``ConcurrencyConflict`` naming the version it
lost to, and the log must end with every version exactly once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from engine.errors import ConcurrencyConflict, StoreError
from engine.log.recorder import AppendResult
from engine.log.sql import SqlRecorder
from tests.log.factory import ev

WRITERS = 2


@pytest.fixture
def writers(sql_url: str) -> Iterator[list[SqlRecorder]]:
    first = SqlRecorder(sql_url)  # creates the schema before the second opens it
    recorders = [first, *(SqlRecorder(sql_url) for _ in range(WRITERS - 1))]
    try:
        yield recorders
    finally:
        for rec in recorders:
            rec.close()


def run_rounds(rounds: int, step: Callable[[int, int], Any]) -> list[list[Any]]:
    """Run ``step(writer, round)`` in one thread per writer, all released together each round."""
    barrier = threading.Barrier(WRITERS)
    outcomes: list[list[Any]] = [[] for _ in range(WRITERS)]
    failures: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            for r in range(1, rounds + 1):
                barrier.wait(timeout=60)
                try:
                    outcomes[i].append(step(i, r))
                except (ConcurrencyConflict, StoreError) as exc:
                    outcomes[i].append(exc)
        except BaseException as exc:  # reported by the test thread, never swallowed
            failures.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(WRITERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not any(t.is_alive() for t in threads), "a writer thread hung"
    assert not failures, failures
    return outcomes


def test_exactly_one_writer_wins_each_version(writers: list[SqlRecorder]) -> None:
    rounds = 40

    def step(i: int, r: int) -> AppendResult:
        # a batch: the contended machine plus one that only this writer touches, so
        # the loser's batch also goes through the per-event (slow) path
        hot, own = writers[i].append([
            ev("hot", r, f"s{r}", writer=f"w{i}", data={"by": i, "round": r}),
            ev(f"own-{i}-{r}", 1, writer=f"w{i}"),
        ])
        assert own.error is None, own.error
        return hot

    outcomes = run_rounds(rounds, step)
    winners: list[int] = []
    for r in range(1, rounds + 1):
        results: list[AppendResult] = [outcomes[i][r - 1] for i in range(WRITERS)]
        won = [i for i, res in enumerate(results) if res.error is None]
        assert len(won) == 1, f"round {r}: winners {won}"
        (loser,) = [res for res in results if res.error is not None]
        assert loser.seq is None
        conflict = loser.error
        assert isinstance(conflict, ConcurrencyConflict)
        assert (conflict.machine_id, conflict.expected, conflict.actual) == ("hot", r - 1, r)
        winners.append(won[0])

    reader = writers[0]
    hot = list(reader.read(machine_id="hot"))
    assert [e.version for e in hot] == list(range(1, rounds + 1))  # none lost, none twice
    assert [e.writer for e in hot] == [f"w{i}" for i in winners]
    assert [e.data for e in hot] == [{"by": i, "round": r} for r, i in enumerate(winners, start=1)]
    everything = list(reader.read())
    assert [e.seq for e in everything] == list(range(1, 3 * rounds + 1))  # gap-free as a whole log
    row = reader.get_machine("hot")
    assert row is not None and (row.version, row.state) == (rounds, f"s{rounds}")
    assert len(reader.machines()) == 1 + WRITERS * rounds


def test_racing_creations_of_one_machine(writers: list[SqlRecorder]) -> None:
    rounds = 25

    def step(i: int, r: int) -> AppendResult:
        return writers[i].append([ev(f"m{r}", 1, "s1", writer=f"w{i}", data={"by": i})])[0]

    outcomes = run_rounds(rounds, step)
    reader = writers[0]
    for r in range(1, rounds + 1):
        results = [outcomes[i][r - 1] for i in range(WRITERS)]
        won = [i for i, res in enumerate(results) if res.error is None]
        assert len(won) == 1, f"round {r}: winners {won}"
        (loser,) = [res.error for res in results if res.error is not None]
        assert isinstance(loser, ConcurrencyConflict) and (loser.expected, loser.actual) == (0, 1)
        (stored,) = reader.read(machine_id=f"m{r}")
        assert stored.writer == f"w{won[0]}" and stored.data == {"by": won[0]}
    assert reader.last_seq() == rounds


def test_crossed_batches_never_split_or_duplicate_a_version(writers: list[SqlRecorder]) -> None:
    """Writers touch two machines in opposite orders: a deadlock on PostgreSQL is possible.

    Whatever the database does (one writer first, or a deadlock that aborts one
    batch), every version is written once, by a writer that was told it succeeded,
    and a batch is never half applied.
    """
    base = writers[0]
    base.append([ev("x", 1), ev("y", 1)])
    rounds = 4

    def step(i: int, r: int) -> list[AppendResult]:
        order = ["x", "y"] if i == 0 else ["y", "x"]
        return writers[i].append([ev(m, r + 1, f"s{r + 1}", writer=f"w{i}") for m in order])

    outcomes = run_rounds(rounds, step)
    for r in range(1, rounds + 1):
        told_ok: dict[str, list[int]] = {"x": [], "y": []}
        for i in range(WRITERS):
            outcome = outcomes[i][r - 1]
            if isinstance(outcome, StoreError):
                continue  # the whole batch was refused (e.g. deadlock detected)
            order = ["x", "y"] if i == 0 else ["y", "x"]
            for m, res in zip(order, outcome, strict=True):
                if res.error is None:
                    told_ok[m].append(i)
        for m in ("x", "y"):
            stored = [e for e in base.read(machine_id=m) if e.version == r + 1]
            assert len(stored) == 1, (m, r, stored)
            assert told_ok[m] == [int(stored[0].writer[1:])]
    for m in ("x", "y"):
        assert [e.version for e in base.read(machine_id=m)] == list(range(1, rounds + 2))
