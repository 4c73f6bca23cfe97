"""Stream sessions: move the chunks of a manifest between stores, recorded as machines, resumable.

A ``ReceiveSession`` pulls a payload into the local chunk store (a site fetching a
model) and records a ``stream_receive`` machine; a ``SendSession`` pushes one to a
peer (a site uploading its update) and records a ``stream_send`` machine. Both do
the same dance:

1. ``offer``: the manifest (address, size, chunk count) is recorded;
2. ``want``: the chunks the receiving side lacks (have/want) are recorded — only
   those travel, so an unchanged model costs its manifest;
3. ``start``, then chunks move with several requests in flight; every
   ``ack_every`` chunks the receiving store is synced and an ``ack`` records the
   batch (acknowledgements in batches, not per chunk);
4. ``complete`` records what moved and what was skipped.

A session found unfinished in the log when it is run again (the process died in
the middle) is *resumed*: ``interrupt`` then ``resume`` on the same machine, with a
want list computed afresh from the store, so acknowledged chunks are not moved again
and chunks that arrived but were not acknowledged are found in the store (the pack
tail scan recovers them). Each chunk is verified by its address on arrival; a bad
copy is never used and is requested again once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from engine.chunks import ChunkStore
from engine.chunks.base import Buffer, page_aligned_buffer
from engine.errors import ChunkIntegrityError, EngineError
from engine.machines.runtime import Runtime
from engine.tensors import Manifest

__all__ = ["ReceiveSession", "SendSession", "StreamReport", "StreamTimeout"]

_OPEN_STATES = ("manifest_offered", "want_known", "transferring")

#: chunks per request when the peer takes several at once (1 MiB chunks: 8 MiB a request)
DEFAULT_BATCH = 8
#: fetch several chunks in one request: their bytes in the order asked
#: ``fetch_many(digests)``, or ``fetch_many(digests, into=arena)`` for a ``cache=False`` receiver
#: (``into(n)`` gives a writable buffer to read an answer of ``n`` bytes into: see ``Transport.request``)
FetchMany = Callable[..., list[Any]]
#: upload several (digest, bytes) in one request
PutMany = Callable[[list[tuple[str, Any]]], None]
#: progress callback: (chunks done, chunks wanted, bytes done)
Progress = Callable[[int, int, int], None]
#: told of each recorded step (``want``, ``resume``, ``ack``, ``complete``, ``fail``) with its data, so the
#: peer can record its side of the session (a site reports its downloads to the server this way)
Reporter = Callable[[str, dict[str, Any]], None]


class StreamTimeout(EngineError):
    """A session ran past its ``stream_timeout``; it is recorded as failed (``expire``)."""

    def __init__(self, session_id: str, timeout: float, done: int, wanted: int) -> None:
        super().__init__(f"stream session {session_id} passed its stream_timeout of {timeout} s "
                         f"with {done} of {wanted} chunk(s) moved")
        self.session_id = session_id


@dataclass
class StreamReport:
    """What one run of a session did."""

    session_id: str
    manifest: str
    chunks_total: int
    chunks_wanted: int
    bytes_moved: int
    resumed: bool
    #: chunks the manifest lists that the receiving side already held
    chunks_skipped: int


class _Session:
    kind = ""

    def __init__(self, runtime: Runtime, session_id: str, *, peer: str, in_flight: int = 4, ack_every: int = 32,
                 progress: Progress | None = None, stream_timeout: float | None = None,
                 entry_timeout: float = 60.0, reporter: Reporter | None = None, batch: int = 1) -> None:
        self.runtime = runtime
        self.session_id = session_id
        self.peer = peer
        self.in_flight = max(1, in_flight)
        #: chunks per request (when the peer moves several at once): requests in flight x batch chunks travel
        self.batch = max(1, batch)
        self.ack_every = max(1, ack_every)
        self.progress = progress
        #: seconds this run of the session may take; past it the session is `expire`d (failed)
        self.stream_timeout = stream_timeout
        #: seconds without an acknowledged batch before the session's timer stalls it (the per-entry timeout)
        self.entry_timeout = entry_timeout
        self.reporter = reporter

    def _groups(self, digests: list[str]) -> list[list[str]]:
        """``digests`` in runs of ``batch``: what one request moves."""
        return [digests[i:i + self.batch] for i in range(0, len(digests), self.batch)]

    def _report(self, event: str, data: dict[str, Any]) -> None:
        if self.reporter is not None:
            self.reporter(event, data)

    def _begin(self, manifest_digest: str, manifest: Manifest) -> tuple[bool, bool]:
        """Create or resume the machine; return (resumed, already complete).

        - no machine yet: a new session (``create``, ``offer``);
        - ``opened`` (the process died between creating it and offering): offered now;
        - ``completed``: nothing to do;
        - cut short in the middle: ``interrupt`` then (in ``_transfer``) ``resume``;
        - ``failed`` or ``aborted`` (a stream_timeout, a timer, an abort): that session is
          over, and a new attempt is a new session ``<id>~2``, ``<id>~3``, ... in the log.
        """
        row = self.runtime.recorder.get_machine(self.session_id)
        attempt = 1
        base = self.session_id
        while row is not None and row.state in ("failed", "aborted"):
            attempt += 1
            self.session_id = f"{base}~{attempt}"
            row = self.runtime.recorder.get_machine(self.session_id)
        offer = {"manifest": manifest_digest, "bytes": manifest.nbytes, "chunks": len(manifest.chunk_digests())}
        if row is None:
            self.runtime.create(self.kind, machine_id=self.session_id,
                                data={"peer": self.peer, "entry_timeout": self.entry_timeout,
                                      **({"attempt": attempt} if attempt > 1 else {})})
            self.runtime.fire(self.session_id, "offer", offer)
            return False, False
        if row.state == "opened":
            self.runtime.fire(self.session_id, "offer", offer)
            return False, False
        if row.state == "completed":
            return False, True
        if row.state in _OPEN_STATES:
            self.runtime.fire(self.session_id, "interrupt", {"reason": "the process restarted"})
        if self.runtime.get(self.session_id).state != "stalled":
            raise EngineError(f"stream session {self.session_id} is {row.state}; it cannot be resumed")
        return True, False

    def _transfer(self, manifest_digest: str, manifest: Manifest, wanted: list[str], resumed: bool,
                  move: Callable[[list[str]], int], sync: Callable[[], None]) -> StreamReport:
        total = len(manifest.chunk_digests())
        if resumed:
            self.runtime.fire(self.session_id, "resume", {"want": len(wanted)})
            self._report("resume", {"want": len(wanted)})
        else:
            self.runtime.fire(self.session_id, "want", {"want": len(wanted), "held": total - len(wanted)})
            if wanted:
                self.runtime.fire(self.session_id, "start", None)
            self._report("want", {"want": len(wanted), "held": total - len(wanted)})
        moved = done = batch_chunks = batch_bytes = 0
        lock = threading.Lock()
        deadline = None if self.stream_timeout is None else time.monotonic() + self.stream_timeout
        expired = threading.Event()
        groups = self._groups(wanted)

        def move_in_time(group: list[str]) -> int:
            if expired.is_set() or (deadline is not None and time.monotonic() > deadline):
                expired.set()
                return -1
            return move(group)

        if groups:
            with ThreadPoolExecutor(max_workers=self.in_flight, thread_name_prefix="stream") as pool:
                for group, size in zip(groups, pool.map(move_in_time, groups), strict=True):
                    if size < 0:
                        continue
                    with lock:
                        done += len(group)
                        moved += size
                        batch_chunks += len(group)
                        batch_bytes += size
                        if batch_chunks >= self.ack_every or done == len(wanted):
                            sync()
                            # each ack re-arms the per-entry deadline (a self-transition keeps the armed one)
                            deadline_us = self.runtime.clock.now_us() + round(self.entry_timeout * 1_000_000)
                            self.runtime.fire(self.session_id, "ack", {"chunks": batch_chunks, "bytes": batch_bytes,
                                                                       "acked": done}, deadline_us=deadline_us)
                            self._report("ack", {"chunks": batch_chunks, "bytes": batch_bytes, "acked": done})
                            batch_chunks = batch_bytes = 0
                        if self.progress is not None:
                            self.progress(done, len(wanted), moved)
        sync()
        if expired.is_set():
            reason = f"stream_timeout of {self.stream_timeout} s passed"
            self.runtime.fire(self.session_id, "expire", {"reason": reason, "acked": done})
            self._report("fail", {"reason": reason})
            raise StreamTimeout(self.session_id, self.stream_timeout or 0.0, done, len(wanted))
        summary = {"bytes": moved, "chunks": len(wanted), "skipped": total - len(wanted)}
        self.runtime.fire(self.session_id, "complete", summary)
        self._report("complete", summary)
        return StreamReport(self.session_id, manifest_digest, total, len(wanted), moved, resumed, total - len(wanted))


class _Arena:
    """Page-aligned buffers that one group's answers are read into, reused group after group.

    A chunk read into one lies on a page boundary (chunks are whole MiB), so a store can
    write it around the page cache from where it is. The buffers are ordinary heap
    memory (a page is skipped to align them), as the answers' bodies were: the process
    reuses it for whatever runs next instead of mapping fresh memory per download.
    """

    def __init__(self) -> None:
        self._buffers: list[memoryview] = []
        self._next = 0

    def __call__(self, size: int) -> memoryview:
        if self._next == len(self._buffers):
            self._buffers.append(page_aligned_buffer(size))
        elif len(self._buffers[self._next]) < size:
            self._buffers[self._next] = page_aligned_buffer(size)  # the old one goes once no view of it is left
        self._next += 1
        return self._buffers[self._next - 1][:size]

    def reset(self) -> None:
        self._next = 0


class ReceiveSession(_Session):
    """Pull a payload's chunks from ``fetch`` into ``store``, recording a ``stream_receive`` machine."""

    kind = "stream_receive"

    def __init__(self, runtime: Runtime, store: ChunkStore, fetch: Callable[[str], bytes], session_id: str, *,
                 peer: str = "server", fetch_many: FetchMany | None = None, cache: bool = True, **kw: Any) -> None:
        """``cache=False``: the chunks are put with that hint (see ``ChunkStore.put``), for a caller that
        takes their bytes as they arrive (``run``'s ``on_manifest``) and will not read them back;
        ``fetch_many`` is then given ``into``, page-aligned buffers reused for the answers."""
        if fetch_many is not None:
            kw.setdefault("batch", DEFAULT_BATCH)
        super().__init__(runtime, session_id, peer=peer, **kw)
        self.store = store
        self.fetch = fetch
        self.fetch_many = fetch_many
        self.cache = cache
        self._on_chunk: Callable[[str, Buffer], None] | None = None
        self._arenas: list[_Arena] = []
        self._arenas_lock = threading.Lock()

    def _keep(self, digest: str, data: Buffer) -> None:
        """Store a received chunk (verified there) and hand its bytes on."""
        self.store.put(digest, data, cache=self.cache)
        if self._on_chunk is not None:
            self._on_chunk(digest, data)

    def _pull(self, digest: str) -> int:
        for attempt in (1, 2):
            data = self.fetch(digest)
            try:
                self._keep(digest, data)
                return len(data)
            except ChunkIntegrityError:
                if attempt == 2:
                    raise
        return 0  # pragma: no cover - the loop returns or raises

    def _pull_group(self, group: list[str]) -> int:
        if self.fetch_many is None or len(group) == 1:
            return sum(self._pull(d) for d in group)
        if self.cache:
            return self._keep_group(group, self.fetch_many(group))
        with self._arenas_lock:
            arena = self._arenas.pop() if self._arenas else _Arena()
        try:
            return self._keep_group(group, self.fetch_many(group, into=arena))
        finally:  # every chunk of the group is stored (or failed) and handed on: its buffers are free again
            arena.reset()
            with self._arenas_lock:
                self._arenas.append(arena)

    def _keep_group(self, group: list[str], datas: list[Any]) -> int:
        moved = 0
        for digest, data in zip(group, datas, strict=True):
            try:
                self._keep(digest, data)
                moved += len(data)
            except ChunkIntegrityError:
                moved += self._pull(digest)  # the bad copy is never used: this one chunk is fetched again
        return moved

    def run(self, manifest_digest: str, on_manifest: Callable[[Manifest], Callable[[str, Buffer], None]] | None = None
            ) -> tuple[Manifest, StreamReport]:
        """Receive the payload (resuming an unfinished session); return its manifest and the report.

        ``on_manifest(manifest)``, called once the manifest is known, may return a callable
        that is given each chunk received (its digest and verified bytes) after it is stored,
        from the threads that fetch them (a ``tensors.Filling``'s ``fill``).
        """
        if self.store.missing([manifest_digest]):
            self._pull(manifest_digest)
            self.store.sync()
        manifest = Manifest.from_bytes(self.store.get(manifest_digest))
        if on_manifest is not None:
            self._on_chunk = on_manifest(manifest)
        resumed, finished = self._begin(manifest_digest, manifest)
        if finished and not self.store.missing(manifest.chunk_digests()):
            total = len(manifest.chunk_digests())
            self._report("complete", {"bytes": 0, "chunks": 0, "skipped": total})  # in case the first was lost
            return manifest, StreamReport(self.session_id, manifest_digest, total, 0, 0, False, total)
        wanted = self.store.missing(manifest.chunk_digests())
        return manifest, self._transfer(manifest_digest, manifest, wanted, resumed, self._pull_group,
                                        self.store.sync)


class SendSession(_Session):
    """Push a payload's chunks from ``store`` to a peer that says what it lacks, recording ``stream_send``."""

    kind = "stream_send"

    def __init__(self, runtime: Runtime, store: ChunkStore, peer_missing: Callable[[list[str]], list[str]],
                 put: Callable[[str, Buffer], None], session_id: str, *, peer: str = "server",
                 put_many: PutMany | None = None, **kw: Any) -> None:
        if put_many is not None:
            kw.setdefault("batch", DEFAULT_BATCH)
        super().__init__(runtime, session_id, peer=peer, **kw)
        self.store = store
        self.peer_missing = peer_missing
        self.put = put
        self.put_many = put_many

    # chunks are read unverified (no hashing here): the peer verifies every chunk against its
    # address before storing it and refuses a bad one
    def _push(self, digest: str) -> int:
        data = self.store.get(digest, verify=False)
        self.put(digest, data)
        return len(data)

    def _push_group(self, group: list[str]) -> int:
        if self.put_many is None or len(group) == 1:
            return sum(self._push(d) for d in group)
        chunks = [(digest, self.store.get(digest, verify=False)) for digest in group]
        self.put_many(chunks)
        return sum(len(data) for _, data in chunks)

    def run(self, manifest_digest: str) -> StreamReport:
        """Send what the peer lacks of the payload (resuming an unfinished session); return the report."""
        manifest = Manifest.from_bytes(self.store.get(manifest_digest))
        resumed, finished = self._begin(manifest_digest, manifest)
        wanted = self.peer_missing([*manifest.chunk_digests(), manifest_digest])
        if finished:
            # sent and acknowledged before; whatever the peer lacks now (it lost it) goes again, unrecorded
            moved = sum(self._push_group(group) for group in self._groups(wanted))
            total = len(manifest.chunk_digests())
            return StreamReport(self.session_id, manifest_digest, total, len(wanted), moved, False, total)
        # the manifest goes last: a peer holding the manifest holds the chunks it names
        chunks_wanted = [d for d in wanted if d != manifest_digest]
        report = self._transfer(manifest_digest, manifest, chunks_wanted, resumed, self._push_group, lambda: None)
        if manifest_digest in wanted:
            self._push(manifest_digest)
        return report
