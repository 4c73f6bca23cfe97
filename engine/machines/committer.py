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
from collections.abc import Sequence
from typing import Any

from engine.errors import StoreError
from engine.log.recorder import AppendResult, EventRecorder, NewEvent

__all__ = ["GroupCommitter"]

#: longest the writer waits for an event loop's pending flush before committing anyway
_FLUSH_WAIT_S = 0.005

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

    The writer never holds events back: it stages (writes, uncommitted) whatever is
    queued the moment it is free, so the database works while callers are still
    planning. It commits when nothing more is queued -- for asyncio callers, once
    their loop has finished the iteration in which they queued (a ``call_soon``
    flush), so every task that was ready shares the one fsync.
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
            if len(batch.events) == 1:
                self._cond.notify()  # start staging now; the flush says when to commit
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

    def append_many(self, events: Sequence[NewEvent]) -> list[AppendResult]:
        """Queue several events (e.g. one per machine) and wait for all of them."""
        slots = [self._enqueue(e) for e in events]
        out = []
        for batch, index in slots:
            batch.done.wait()
            if batch.error is not None:
                raise batch.error
            out.append(batch.results[index])
        return out

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._open.events and not self._closing:
                    self._cond.wait()
                if not self._open.events and self._closing:
                    return
            self._commit_round()

    def _commit_round(self) -> None:
        """Stage batches as they are queued, then commit them all in one transaction.

        The SQL work of each batch runs while its callers' event loop is still
        planning the next events (the driver releases the GIL while the database
        works); the commit waits until no loop has queued events left to flush, so
        one transaction, and one fsync, takes everything that was ready.
        """
        staged: list[_Batch] = []
        count = 0
        try:
            while count < self.max_batch:
                with self._cond:
                    if not self._open.events and self._flush_scheduled and not self._closing:
                        # an event loop is still queueing this iteration's events; its
                        # flush callback wakes us (bounded, should a loop stop early)
                        self._cond.wait(_FLUSH_WAIT_S)
                    if not self._open.events:
                        break
                    batch = self._open
                    self._open = _Batch()
                staged.append(batch)
                batch.results = self.recorder.stage(batch.events)
                count += len(batch.events)
            self.recorder.commit_staged()
            self.batches += 1
            self.events += count
        except BaseException as exc:  # surfaced to every waiting caller of the round
            logger.error("group commit of %d event(s) failed: %s", count, exc)
            try:
                self.recorder.abort_staged()
            except Exception:  # the recorder already reported the original failure
                logger.debug("abort after a failed commit failed too", exc_info=True)
            for batch in staged:
                batch.error = exc
        for batch in staged:
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
