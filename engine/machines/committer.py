"""Group commit: many callers' events, one transaction, each caller woken when durable.

Callers (threads or asyncio tasks) queue events; one writer thread takes everything
queued, appends it as one batch, and wakes the callers of that batch together. While
a batch commits, the next one fills, so throughput grows with concurrency and a lone
caller still pays only one commit.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

from engine import faults
from engine.errors import StoreError
from engine.log.recorder import AppendResult, EventRecorder, NewEvent

__all__ = ["GroupCommitter"]

logger = logging.getLogger(__name__)


class _Batch:
    __slots__ = ("done", "error", "events", "futures", "results")

    def __init__(self) -> None:
        self.events: list[NewEvent] = []
        self.results: list[AppendResult] = []
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.futures: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[AppendResult], int]] = []


class GroupCommitter:
    """Batches appends from many callers into single transactions on ``recorder``.

    The writer never waits to fill a batch: it commits whatever is queued the moment
    it is free. Under load that keeps two batches in flight -- one committing while
    the callers woken by the previous one plan their next events -- which measured
    faster than holding commits back to gather bigger batches (the fsync is cheap
    next to the per-event work it would serialize). asyncio callers of one event
    loop wake the writer once per loop iteration, after all ready tasks have queued.
    """

    def __init__(self, recorder: EventRecorder, *, max_batch: int = 4096) -> None:
        self.recorder = recorder
        self.max_batch = max_batch
        # a bare Lock for the hot enqueue path (Condition.__enter__ is Python-level);
        # the Condition shares it for waking the writer
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._open = _Batch()
        self._closing = False
        self._flush_scheduled: set[asyncio.AbstractEventLoop] = set()
        self.batches = 0
        self.events = 0
        self._thread = threading.Thread(target=self._run, name="fedlog-group-commit", daemon=True)
        self._thread.start()

    def _enqueue(self, event: NewEvent) -> tuple[_Batch, int]:
        with self._lock:
            if self._closing:
                raise StoreError("the event log is closing; no more appends")
            batch = self._open
            batch.events.append(event)
            if len(batch.events) == 1:
                self._cond.notify()
            return batch, len(batch.events) - 1

    def append(self, event: NewEvent) -> AppendResult:
        """Queue ``event`` and block until its batch is durable; return its result."""
        batch, index = self._enqueue(event)
        batch.done.wait()
        if batch.error is not None:
            raise batch.error
        return batch.results[index]

    async def append_async(self, event: NewEvent) -> AppendResult:
        """Queue ``event`` and await durability without blocking the event loop."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[AppendResult] = loop.create_future()
        with self._lock:
            if self._closing:
                raise StoreError("the event log is closing; no more appends")
            batch = self._open
            batch.events.append(event)
            batch.futures.append((loop, future, len(batch.events) - 1))
            schedule = loop not in self._flush_scheduled
            if schedule:
                self._flush_scheduled.add(loop)
        if schedule:
            # runs after every task already ready in this loop iteration has queued
            loop.call_soon(self._flush, loop)
        return await future

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            self._flush_scheduled.discard(loop)
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._open.events and not self._closing:
                    self._cond.wait()
                if not self._open.events and self._closing:
                    return
                batch = self._open
                self._open = _Batch()
            try:
                results: list[AppendResult] = []
                for start in range(0, len(batch.events), self.max_batch):
                    results.extend(self.recorder.append(batch.events[start : start + self.max_batch]))
                batch.results = results
                self.batches += 1
                self.events += len(batch.events)
                faults.appended(len(batch.events))  # a crash test's kill at a log position
            except BaseException as exc:  # surfaced to every waiting caller
                logger.error("group commit of %d event(s) failed: %s", len(batch.events), exc)
                batch.error = exc
            batch.done.set()
            self._resolve_futures(batch)

    @staticmethod
    def _resolve_futures(batch: _Batch) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[AppendResult], int]]] = {}
        for loop, future, index in batch.futures:
            by_loop.setdefault(loop, []).append((future, index))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_settle, items, batch)

    def close(self) -> None:
        """Commit what is queued, then stop the writer thread."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join()


def _settle(items: list[tuple[asyncio.Future[AppendResult], int]], batch: Any) -> None:
    for future, index in items:
        if future.done():
            continue
        if batch.error is not None:
            future.set_exception(batch.error)
        else:
            future.set_result(batch.results[index])
