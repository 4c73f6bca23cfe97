"""Armed deadlines, earliest first, with stale entries dropped lazily.

The runtime arms a timer whenever a machine enters a state with a timeout. A machine
that moves on leaves its old heap entry behind; instead of searching the heap we
remember each machine's current deadline and skip entries that no longer match. The
heap is rebuilt when stale entries outnumber live ones, so a long-running process
whose machines change state often does not grow without bound.
"""

from __future__ import annotations

import heapq
import threading

__all__ = ["TimerQueue"]

_COMPACT_SLACK = 1024


class TimerQueue:
    """Thread-safe min-heap of (deadline_us, machine_id), one live deadline per machine."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self._heap: list[tuple[int, str]] = []
        self._armed: dict[str, int] = {}

    def arm(self, deadline_us: int, machine_id: str) -> bool:
        """Set ``machine_id``'s deadline; return True if it became the earliest."""
        with self.cond:
            if self._armed.get(machine_id) == deadline_us:
                return False
            self._armed[machine_id] = deadline_us
            heapq.heappush(self._heap, (deadline_us, machine_id))
            if len(self._heap) > 2 * len(self._armed) + _COMPACT_SLACK:
                self._heap = [(d, m) for m, d in self._armed.items()]
                heapq.heapify(self._heap)
            earliest = self._heap[0] == (deadline_us, machine_id)
            if earliest:
                self.cond.notify()
            return earliest

    def disarm(self, machine_id: str) -> None:
        """Forget ``machine_id``'s deadline (it reached a state without a timeout)."""
        with self.cond:
            self._armed.pop(machine_id, None)

    def _drop_stale(self) -> None:
        while self._heap and self._armed.get(self._heap[0][1]) != self._heap[0][0]:
            heapq.heappop(self._heap)

    def next_deadline(self) -> int | None:
        """The earliest live deadline, or None."""
        with self.cond:
            self._drop_stale()
            return self._heap[0][0] if self._heap else None

    def pop_due(self, now_us: int) -> tuple[int, str] | None:
        """Remove and return the earliest timer due at ``now_us`` (inclusive), or None."""
        with self.cond:
            self._drop_stale()
            if not self._heap or self._heap[0][0] > now_us:
                return None
            deadline, machine_id = heapq.heappop(self._heap)
            del self._armed[machine_id]
            return deadline, machine_id

    def __len__(self) -> int:
        with self.cond:
            return len(self._armed)
