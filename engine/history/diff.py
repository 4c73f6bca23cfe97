"""``fedlog replay diff DB1 DB2 --job J``: the first point where two runs of the same job diverge.

Runs of the same job on different days interleave their machines differently, so
the logs are compared machine by machine: each machine's transitions in version
order — trigger, source, destination and data — ignoring times, sequence numbers,
deadlines and writers. The divergence reported is the earliest (in the first log's
order) event that differs, or a machine present in one run only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.log.recorder import EventRecorder, StoredEvent

__all__ = ["Divergence", "first_divergence"]

#: data keys that carry timing, not behaviour
_VOLATILE = frozenset({"heartbeat_timeout", "deadline_us", "ts_us", "at", "elapsed_s"})


@dataclass(frozen=True)
class Divergence:
    """Where two runs part: the machine, its version, and each run's event there (None: it has none)."""

    machine_id: str
    version: int
    left: StoredEvent | None
    right: StoredEvent | None
    compared: int

    def describe(self) -> str:
        def side(event: StoredEvent | None) -> str:
            if event is None:
                return "(no such event)"
            data = "" if event.data is None else f" {_clean(event.data)}"
            return f"seq {event.seq}: {event.trigger}: {event.source or '∅'} → {event.dest}{data}"

        return (f"first divergence at {self.machine_id} version {self.version} "
                f"(after {self.compared:,} equal events):\n  run 1 {side(self.left)}\n  run 2 {side(self.right)}")


def _clean(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _clean(v) for k, v in sorted(data.items()) if k not in _VOLATILE}
    if isinstance(data, list):
        return [_clean(v) for v in data]
    return data


def _key(event: StoredEvent) -> tuple[Any, ...]:
    return (event.trigger, event.source, event.dest, _clean(event.data))


def _by_machine(log: EventRecorder, job_id: str) -> dict[str, list[StoredEvent]]:
    machines: dict[str, list[StoredEvent]] = {}
    for event in log.read(job_id=job_id):
        machines.setdefault(event.machine_id, []).append(event)
    return machines


def first_divergence(left: EventRecorder, right: EventRecorder, job_id: str) -> Divergence | None:
    """The earliest difference between the job's machines in two logs, or None when they agree."""
    a, b = _by_machine(left, job_id), _by_machine(right, job_id)
    found: list[tuple[int, Divergence]] = []
    compared = 0
    for machine_id in sorted(set(a) | set(b)):
        ea, eb = a.get(machine_id, []), b.get(machine_id, [])
        for i in range(max(len(ea), len(eb))):
            x = ea[i] if i < len(ea) else None
            y = eb[i] if i < len(eb) else None
            if x is not None and y is not None and _key(x) == _key(y):
                compared += 1
                continue
            order = x.seq if x is not None else (y.seq if y is not None else 0)
            found.append((order, Divergence(machine_id, i + 1, x, y, 0)))
            break
    if not found:
        return None
    _, first = min(found, key=lambda item: item[0])
    return Divergence(first.machine_id, first.version, first.left, first.right, compared)
