"""The event log's interface: what every backend (memory, SQLite, PostgreSQL) promises.

A recorder appends batches of events atomically per event and keeps the
``machine_states`` projection in the same transaction. Appends carry the version
the writer expects the machine to be at; a mismatch is a ``ConcurrencyConflict``
and writes nothing for that event. The contract suite in ``tests/log`` runs against
every implementation.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from engine.errors import ConcurrencyConflict

__all__ = ["AppendResult", "EventRecorder", "MachineRow", "NewEvent", "StoredEvent"]

JsonData = dict[str, Any]


@dataclass(frozen=True, slots=True)
class NewEvent:
    """A transition about to be appended; ``version`` is the machine's new version.

    The writer expects the machine to be at ``version - 1`` (0: it does not exist yet).
    """

    machine_id: str
    kind: str
    chart_version: int
    version: int
    trigger: str
    source: str | None
    dest: str
    terminal: bool
    ts_us: int
    writer: str
    data: JsonData | None = None
    deadline_us: int | None = None
    job_id: str | None = None
    round: int | None = None
    site: str | None = None


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An event as the log holds it: a ``NewEvent`` plus its global sequence number."""

    seq: int
    machine_id: str
    kind: str
    chart_version: int
    version: int
    trigger: str
    source: str | None
    dest: str
    ts_us: int
    writer: str
    data: JsonData | None = None
    deadline_us: int | None = None
    job_id: str | None = None
    round: int | None = None
    site: str | None = None


@dataclass(frozen=True, slots=True)
class MachineRow:
    """A machine's projected current state (the cache boot reads instead of folding)."""

    machine_id: str
    kind: str
    chart_version: int
    state: str
    version: int
    terminal: bool
    deadline_us: int | None
    job_id: str | None
    round: int | None
    site: str | None
    created_us: int
    updated_us: int


@dataclass(frozen=True, slots=True)
class AppendResult:
    """Outcome of one event of a batch: its sequence number, or the conflict it hit."""

    seq: int | None
    error: ConcurrencyConflict | None = None


def stored_from_new(event: NewEvent, seq: int) -> StoredEvent:
    """Build the stored form of ``event`` once it got ``seq``."""
    return StoredEvent(
        seq=seq,
        machine_id=event.machine_id,
        kind=event.kind,
        chart_version=event.chart_version,
        version=event.version,
        trigger=event.trigger,
        source=event.source,
        dest=event.dest,
        ts_us=event.ts_us,
        writer=event.writer,
        data=event.data,
        deadline_us=event.deadline_us,
        job_id=event.job_id,
        round=event.round,
        site=event.site,
    )


def row_after(event: NewEvent, previous: MachineRow | None) -> MachineRow:
    """The projection row of a machine once ``event`` is applied on top of ``previous``.

    Kind, job and site are fixed by the machine's first event (the SQL recorders never
    rewrite them); ``round`` follows the latest event that names one.
    """
    if previous is None:
        return MachineRow(
            event.machine_id, event.kind, event.chart_version, event.dest, event.version,
            event.terminal, event.deadline_us, event.job_id, event.round, event.site,
            event.ts_us, event.ts_us,
        )
    return MachineRow(
        event.machine_id, previous.kind, event.chart_version, event.dest, event.version,
        event.terminal, event.deadline_us, previous.job_id,
        event.round if event.round is not None else previous.round,
        previous.site, previous.created_us, event.ts_us,
    )


def chained_conflict(event: NewEvent, actual: int) -> ConcurrencyConflict:
    """The conflict of an event refused because an earlier event of its machine in the same batch was.

    Its versions alone would read as if it should have succeeded (it expected the
    version the rejected event was meant to create), so the message says why.
    """
    return ConcurrencyConflict(
        event.machine_id, event.version - 1, actual,
        reason=(
            f"version {event.version} was not appended because an earlier event of this machine "
            f"in the same batch was rejected and this one was planned on top of it "
            f"(the log holds version {actual})"
        ),
    )


class EventRecorder(ABC):
    """Append-only event storage with a current-state projection.

    Implementations are thread-safe for readers; a single writer (the group
    committer) calls ``append``.
    """

    #: human-readable location of the log (path or URL without password)
    target: str = ""

    @abstractmethod
    def append(self, batch: Sequence[NewEvent]) -> list[AppendResult]:
        """Durably append ``batch``; one result per event, in order.

        Events that hit a version conflict are not written and carry the
        ``ConcurrencyConflict`` in their result; the rest are committed. Events of
        one machine must appear in version order; once one of them is rejected, the
        later ones of that machine in the batch are rejected too. Returns only after
        the batch is durable at the recorder's durability level.
        """

    def append_one(self, event: NewEvent) -> StoredEvent:
        """Append a single event; raise ``ConcurrencyConflict`` if it lost a race."""
        (result,) = self.append([event])
        if result.error is not None:
            raise result.error
        assert result.seq is not None
        return stored_from_new(event, result.seq)

    @abstractmethod
    def read(
        self,
        *,
        machine_id: str | None = None,
        job_id: str | None = None,
        after_seq: int = 0,
        until_seq: int | None = None,
        until_us: int | None = None,
        limit: int | None = None,
        with_data: bool = True,
    ) -> Iterator[StoredEvent]:
        """Yield stored events in ``seq`` order, filtered as asked.

        ``after_seq`` is exclusive, ``until_seq`` and ``until_us`` inclusive; ``limit``
        caps the number yielded. ``with_data=False`` leaves ``data`` as None, which
        spares decoding it when only the transitions matter.
        """

    @abstractmethod
    def get_machine(self, machine_id: str) -> MachineRow | None:
        """Return a machine's projected row, or None."""

    @abstractmethod
    def machines(
        self, *, kind: str | None = None, live_only: bool = False, job_id: str | None = None
    ) -> list[MachineRow]:
        """Return projected rows ordered by machine id (``live_only``: non-terminal machines only)."""

    @abstractmethod
    def timers(self) -> list[tuple[int, str, int]]:
        """Return ``(deadline_us, machine_id, version)`` of every armed timer, earliest first.

        A timer is armed on every non-terminal machine whose projection holds a deadline.
        """

    @abstractmethod
    def last_seq(self) -> int:
        """Return the highest sequence number in the log (0 when empty)."""

    def close(self) -> None:  # noqa: B027 - optional hook: memory recorders hold nothing
        """Release connections and the writer lease."""

    def __enter__(self) -> EventRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
