"""An in-memory recorder: same contract as the SQL ones, for unit tests and simulations."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

from engine.errors import ConcurrencyConflict
from engine.log.recorder import (
    AppendResult,
    EventRecorder,
    MachineRow,
    NewEvent,
    StoredEvent,
    row_after,
    stored_from_new,
)

__all__ = ["MemoryRecorder"]


class MemoryRecorder(EventRecorder):
    """Keeps events and projection in Python lists and dicts; durable until the process ends."""

    def __init__(self) -> None:
        self.target = "memory"
        self._events: list[StoredEvent] = []
        self._by_machine: dict[str, list[StoredEvent]] = {}
        self._rows: dict[str, MachineRow] = {}
        self._lock = threading.Lock()

    def append(self, batch: Sequence[NewEvent]) -> list[AppendResult]:
        results: list[AppendResult] = []
        with self._lock:
            for event in batch:
                previous = self._rows.get(event.machine_id)
                actual = previous.version if previous else 0
                if event.version != actual + 1:
                    results.append(
                        AppendResult(None, ConcurrencyConflict(event.machine_id, event.version - 1, actual))
                    )
                    continue
                stored = stored_from_new(event, len(self._events) + 1)
                self._events.append(stored)
                self._by_machine.setdefault(event.machine_id, []).append(stored)
                self._rows[event.machine_id] = row_after(event, previous)
                results.append(AppendResult(stored.seq))
        return results

    def read(
        self,
        *,
        machine_id: str | None = None,
        job_id: str | None = None,
        after_seq: int = 0,
        until_seq: int | None = None,
        until_us: int | None = None,
        limit: int | None = None,
    ) -> Iterator[StoredEvent]:
        with self._lock:
            source = list(self._by_machine.get(machine_id, [])) if machine_id else self._events[after_seq:]
        count = 0
        for event in source:
            if event.seq <= after_seq:
                continue
            if until_seq is not None and event.seq > until_seq:
                break
            if until_us is not None and event.ts_us > until_us:
                continue
            if job_id is not None and event.job_id != job_id:
                continue
            if limit is not None and count >= limit:
                break
            count += 1
            yield event

    def get_machine(self, machine_id: str) -> MachineRow | None:
        return self._rows.get(machine_id)

    def machines(
        self, *, kind: str | None = None, live_only: bool = False, job_id: str | None = None
    ) -> list[MachineRow]:
        with self._lock:
            rows = list(self._rows.values())
        return [
            r
            for r in rows
            if (kind is None or r.kind == kind)
            and (not live_only or not r.terminal)
            and (job_id is None or r.job_id == job_id)
        ]

    def timers(self) -> list[tuple[int, str, int]]:
        with self._lock:
            return sorted(
                (r.deadline_us, r.machine_id, r.version)
                for r in self._rows.values()
                if r.deadline_us is not None and not r.terminal
            )

    def last_seq(self) -> int:
        return len(self._events)
