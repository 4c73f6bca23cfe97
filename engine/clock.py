"""The only source of time and identifiers in the engine.

Machines, timers and controllers read time and make ids through a ``Clock`` that
is passed in, never from ``time`` or ``uuid`` directly, so a replay or a test can
reproduce exactly the same events. Times are integer microseconds since the Unix
epoch (UTC): exact, comparable across dialects, never a float.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

__all__ = ["Clock", "ManualClock", "SystemClock", "format_us", "parse_time_us"]

US_PER_S = 1_000_000


class Clock:
    """Interface: current time in µs, fresh ids, seeded randomness, and waiting."""

    def now_us(self) -> int:
        """Return the current time, microseconds since the epoch (UTC)."""
        raise NotImplementedError

    def new_id(self) -> str:
        """Return a fresh identifier (32 hex characters)."""
        raise NotImplementedError

    def random(self) -> random.Random:
        """Return this clock's random source (seeded where the clock is deterministic)."""
        raise NotImplementedError

    def wait(self, cond: threading.Condition, until_us: int | None) -> None:
        """Block on ``cond`` (held by the caller) until notified or until ``until_us``."""
        raise NotImplementedError

    def subscribe(self, callback: Callable[[], None]) -> None:
        """Ask to be called when time jumps (manual clocks); real clocks never call it."""

    def unsubscribe(self, callback: Callable[[], None]) -> None:
        """Stop calling ``callback`` (no-op if it was not subscribed)."""


class SystemClock(Clock):
    """Wall-clock time and random uuids: what a real server uses."""

    def __init__(self) -> None:
        self._random = random.Random()

    def now_us(self) -> int:
        return time.time_ns() // 1000

    def new_id(self) -> str:
        return uuid.uuid4().hex

    def random(self) -> random.Random:
        return self._random

    def wait(self, cond: threading.Condition, until_us: int | None) -> None:
        if until_us is None:
            cond.wait()
            return
        delay = (until_us - self.now_us()) / US_PER_S
        if delay > 0:
            cond.wait(delay)


class ManualClock(Clock):
    """A clock that moves only when told: tests, simulations and deterministic drivers.

    Ids are a counter so two runs with the same inputs produce the same ids.
    """

    def __init__(self, start_us: int = 1_700_000_000 * US_PER_S, seed: int = 0) -> None:
        self._now = start_us
        self._counter = 0
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._listeners: list[Callable[[], None]] = []

    def now_us(self) -> int:
        return self._now

    def new_id(self) -> str:
        with self._lock:
            self._counter += 1
            return f"{self._counter:032x}"

    def random(self) -> random.Random:
        return self._random

    def set(self, now_us: int) -> None:
        """Jump to ``now_us`` (never backwards) and wake every waiter."""
        if now_us < self._now:
            from engine.errors import EngineError

            raise EngineError(f"a clock never goes back: asked for {now_us}, it is already {self._now}")
        self._now = now_us
        for listener in list(self._listeners):
            listener()

    def advance(self, seconds: float) -> None:
        """Move forward by ``seconds`` and wake every waiter."""
        self.set(self._now + round(seconds * US_PER_S))

    def wait(self, cond: threading.Condition, until_us: int | None) -> None:
        # Time moves only through set(); a listener notifies cond then. A short real
        # wait bounds the cost of a notification that raced ahead of us.
        if until_us is None or until_us > self._now:
            cond.wait(0.05)

    def subscribe(self, callback: Callable[[], None]) -> None:
        self._listeners.append(callback)

    def unsubscribe(self, callback: Callable[[], None]) -> None:
        if callback in self._listeners:
            self._listeners.remove(callback)


def format_us(ts_us: int | None) -> str:
    """Render µs since the epoch as ISO 8601 UTC with microseconds (``-`` for None)."""
    if ts_us is None:
        return "-"
    dt = datetime.fromtimestamp(ts_us // US_PER_S, tz=UTC).replace(microsecond=ts_us % US_PER_S)
    # always six fractional digits, like the SQL views, so text compares and sorts alike
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time_us(text: str) -> int:
    """Parse an ISO 8601 time (naive means UTC) into µs since the epoch."""
    dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    delta = dt - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * US_PER_S + delta.microseconds
