"""Hand-over from other threads to the task manager's event loop, and its own alarms.

The runtime fires state timeouts on its timer thread and runs entry effects there;
the task manager's state lives on one asyncio loop. Effects therefore only *post*
an item here (thread-safe); one worker task on the loop handles items in order.
Alarms are the manager's own wake-ups (a task's deadline while the engine's timer
is the broadcast wait; the end of the dead-client grace); they are kept in memory
and recomputed from the log by a recovery, so they need no events of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from engine.clock import Clock
from engine.errors import EngineError

__all__ = ["Item", "LoopBridge"]

logger = logging.getLogger(__name__)

US = 1_000_000

#: a unit of work posted to the loop: (kind, *arguments)
Item = tuple[Any, ...]


class LoopBridge:
    """A thread-safe work queue drained on one event loop, plus a heap of timed wake-ups.

    Args:
        clock: where "now" comes from (alarms are absolute µs on this clock).
        handle: coroutine run on the loop for each posted item, one at a time.
        on_alarm: coroutine run on the loop for each alarm key that falls due.
    """

    def __init__(self, clock: Clock, handle: Callable[[Item], Awaitable[None]],
                 on_alarm: Callable[[str], Awaitable[None]]) -> None:
        self.clock = clock
        self._handle = handle
        self._on_alarm = on_alarm
        self.loop: asyncio.AbstractEventLoop | None = None
        self._queue: deque[Item] = deque()
        self._worker: asyncio.Task[None] | None = None
        self._alarms: list[tuple[int, str]] = []
        self._armed: set[tuple[int, str]] = set()
        self._closed = False
        self._runner: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._subscribed = False

    # -- the loop -------------------------------------------------------------------

    def bind(self) -> asyncio.AbstractEventLoop:
        """Adopt the running loop (the first async call does); a second loop is an error."""
        loop = asyncio.get_running_loop()
        if self.loop is None:
            self.loop = loop
        elif self.loop is not loop:
            raise EngineError("a task manager serves one event loop; it was first used on another")
        return loop

    def post(self, item: Item) -> None:
        """Queue ``item`` for the loop; callable from any thread (dropped once closed)."""
        loop = self.loop
        if loop is None or self._closed:
            return
        try:
            loop.call_soon_threadsafe(self._enqueue, item)
        except RuntimeError:  # the loop is closed: nothing is left to hand work to
            logger.debug("dropped %s: the event loop is closed", item)

    def _enqueue(self, item: Item) -> None:
        if self._closed:
            return
        self._queue.append(item)
        if self._worker is None or self._worker.done():
            assert self.loop is not None
            self._worker = self.loop.create_task(self._drain())

    async def _drain(self) -> None:
        while self._queue:
            item = self._queue.popleft()
            try:
                await self._handle(item)
            except Exception:
                logger.exception("task manager work item %s failed", item)

    async def settle(self) -> None:
        """Return once every item posted so far (and what handling it posted) is handled."""
        while True:
            # let callbacks already scheduled with call_soon_threadsafe enqueue first
            await asyncio.sleep(0)
            worker = self._worker
            if (worker is None or worker.done()) and not self._queue:
                return
            if worker is not None and not worker.done():
                await asyncio.wait([worker])

    # -- alarms ---------------------------------------------------------------------

    def add_alarm(self, at_us: int, key: str) -> None:
        """Run ``on_alarm(key)`` once the clock reaches ``at_us``."""
        if (at_us, key) in self._armed:
            return
        self._armed.add((at_us, key))
        heapq.heappush(self._alarms, (at_us, key))
        if self._wake is not None:
            self._wake.set()

    def next_alarm(self) -> int | None:
        """The earliest pending alarm (µs), or None."""
        return self._alarms[0][0] if self._alarms else None

    async def run_due_alarms(self, now_us: int | None = None) -> int:
        """Run every alarm due at ``now_us`` (default: now), earliest first; return how many."""
        now = self.clock.now_us() if now_us is None else now_us
        ran = 0
        while self._alarms and self._alarms[0][0] <= now:
            entry = heapq.heappop(self._alarms)
            self._armed.discard(entry)
            ran += 1
            try:
                await self._on_alarm(entry[1])
            except Exception:
                logger.exception("task manager alarm %s failed", entry[1])
        return ran

    def start(self) -> None:
        """Run alarms as they fall due, in a background task of the running loop."""
        loop = self.bind()
        if self._runner is not None and not self._runner.done():
            return
        self._wake = asyncio.Event()
        if not self._subscribed:
            self._subscribed = True
            self.clock.subscribe(self._clock_moved)
        self._runner = loop.create_task(self._run(), name="fedlog-task-alarms")

    def _clock_moved(self) -> None:
        # called by manual clocks from whatever thread moved them
        loop, wake = self.loop, self._wake
        if loop is None or wake is None or self._closed:
            return
        try:
            loop.call_soon_threadsafe(wake.set)
        except RuntimeError:
            logger.debug("clock moved after the event loop closed")

    async def _run(self) -> None:
        assert self._wake is not None
        while not self._closed:
            nxt = self.next_alarm()
            now = self.clock.now_us()
            if nxt is not None and nxt <= now:
                await self.run_due_alarms(now)
                continue
            self._wake.clear()
            timeout = None if nxt is None else (nxt - now) / US
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def close(self) -> None:
        """Stop the alarm task and finish the queued work; later posts are dropped."""
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
            self._runner = None
        await self.settle()
        self._closed = True
