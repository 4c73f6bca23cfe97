"""An in-memory recorder: same contract as the SQL ones, for unit tests and simulations."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import replace

import orjson

from engine.errors import ConcurrencyConflict, StoreError
from engine.log.recorder import (
    AppendResult,
    EventRecorder,
    MachineRow,
    NewEvent,
    StoredEvent,
    chained_conflict,
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
        # Store data as the SQL recorders would hand it back (a JSON round trip), so a
        # test on memory sees what SQLite and PostgreSQL give (lists for tuples, an
        # error for what JSON cannot hold) and a caller mutating its dict later cannot
        # rewrite history. Encoding happens before anything is stored: a bad event
        # fails the whole batch, as it does on SQL.
        try:
            datas = [None if e.data is None else orjson.loads(orjson.dumps(e.data)) for e in batch]
        except TypeError as exc:
            raise StoreError(f"append to {self.target} failed: {exc}") from exc
        results: list[AppendResult] = []
        lost: set[str] = set()
        with self._lock:
            for event, data in zip(batch, datas, strict=True):
                previous = self._rows.get(event.machine_id)
                actual = previous.version if previous else 0
                if event.machine_id in lost:
                    results.append(AppendResult(None, chained_conflict(event, actual)))
                    continue
                if event.version != actual + 1:
                    lost.add(event.machine_id)
                    results.append(
                        AppendResult(None, ConcurrencyConflict(event.machine_id, event.version - 1, actual))
                    )
                    continue
                stored = stored_from_new(event, len(self._events) + 1)
                if data is not None:
                    stored = replace(stored, data=data)
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
        with_data: bool = True,
    ) -> Iterator[StoredEvent]:
        with self._lock:
            if machine_id is not None:
                source = list(self._by_machine.get(machine_id, []))
            else:
                source = self._events[max(after_seq, 0):]
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
            yield event if with_data or event.data is None else replace(event, data=None)

    def get_machine(self, machine_id: str) -> MachineRow | None:
        return self._rows.get(machine_id)

    def machines(
        self, *, kind: str | None = None, live_only: bool = False, job_id: str | None = None
    ) -> list[MachineRow]:
        with self._lock:
            rows = sorted(self._rows.values(), key=lambda r: r.machine_id)
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
