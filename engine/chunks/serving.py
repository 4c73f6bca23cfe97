"""Chunks being served: read from the store once into reused memory, sent from there to every site.

Four sites downloading the same model ask for the same chunks within moments of each
other. Served from a mapped pack file, the first request for each chunk not in the
page cache read it from disk into new page-cache pages, page fault by page fault, on
the server's event loop; and on virtual machines that hand idle memory back to the
host, new pages are fresh host memory, slow to fill and then to copy from.

So a ``ServedChunks`` holds the chunks being downloaded, up to ``capacity`` bytes,
each read once (``ChunkStore.load``: copied from the page cache when it is all there,
else read around it with ``O_DIRECT``), on a worker thread, into buffers that are used
again once their chunk has aged out (least recently used first) and no answer is
sending it any more: every view handed out keeps its buffer's exporter alive, and the
buffer comes back only when the last view is gone (a weakref finalizer), however long
a connection holds it. Two requests for the same chunk at once wait for one read. A
site further behind the others than the capacity reads the chunk again, from disk.
After ``IDLE_S`` seconds without a request everything is let go (``release``): a server
between rounds or done with a job does not keep the memory, where pages of a mapped
pack would at least have been the kernel's to reclaim.

``tools/bench/stream.py`` (a 1 GiB model the page cache had dropped, 4 receivers), in 3
runs alternating with the mapped packs: the server spent 0.36-0.41 CPU-s per GiB sent
against 0.56-0.63, the aggregate rose to 1.34-1.57 GiB/s from 1.17-1.26, and the
server's peak RSS fell to 0.37 GB from 1.14 GB (mapped pages count in it). Buffers
allocated afresh for every chunk instead of reused cost 1.1-1.6 CPU-s/GiB: the
reuse is what pays.
"""

from __future__ import annotations

import ctypes
import math
import threading
import time
import weakref
from collections import OrderedDict

from engine.chunks.base import PAGE, Buffer, ChunkStore, page_skip
from engine.errors import ConfigError

__all__ = ["IDLE_S", "SERVED_BYTES", "SPARE_BUFFERS", "ServedChunks"]

#: bytes of chunks held for downloads by default: a quarter of a 1 GiB model, several
#: times the spread between 4 sites fetching it at once on one machine
SERVED_BYTES = 256 << 20
#: spare buffers of a size kept for the next reads: this many, or up to an eighth of the capacity;
#: a buffer coming back beyond that is let go (it was allocated while many were being sent)
SPARE_BUFFERS = 8
#: seconds without a download after which every held chunk and spare buffer is let go: a
#: server between rounds, or done with a job, does not keep hundreds of MiB it no longer sends
IDLE_S = 10.0
#: buffers come in steps of this size, so chunks of about the same size use each other's
_STEP = 16 * PAGE


class ServedChunks:
    """Chunks held in memory for the sites downloading them; see the module docstring.

    ``get(digest)`` returns the bytes, read from the store if they are not held. Safe to
    use from several threads; ``get`` blocks (a disk read), so the server calls it on a
    worker thread.
    """

    def __init__(self, store: ChunkStore, capacity: int = SERVED_BYTES, idle_s: float = IDLE_S) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise ConfigError(f"served chunks: the capacity is a number of bytes >= 0, got {capacity!r}")
        if isinstance(idle_s, bool) or not isinstance(idle_s, int | float) or not 0 < idle_s < math.inf:
            raise ConfigError(f"served chunks: the idle time is a number of seconds > 0, got {idle_s!r}")
        self.store = store
        self.capacity = capacity
        self.idle_s = idle_s
        #: when ``get`` was last called (monotonic), and the timer that looks for idleness
        self._used = 0.0
        self._idle_timer: threading.Timer | None = None
        self._held: OrderedDict[str, Buffer] = OrderedDict()  # least recently used first
        self._held_bytes = 0
        #: chunks being read, and the event their readers set when done
        self._loading: dict[str, threading.Event] = {}
        #: buffers no view refers to any more, by size, for the next reads
        self._free: dict[int, list[bytearray]] = {}
        #: bytes of all buffers: held, still in answers, or free
        self._buffer_bytes = 0
        # reentrant: a buffer's finalizer runs wherever its last view goes, this lock held or not
        self._lock = threading.RLock()
        #: reads from the store (the chunks not found held) and buffers allocated (not reused)
        self.loads = 0
        self.allocated = 0

    @property
    def held_bytes(self) -> int:
        """Bytes of the chunks held now."""
        with self._lock:
            return self._held_bytes

    @property
    def buffer_bytes(self) -> int:
        """Bytes of memory in buffers: the held chunks', those still being sent, and spare ones."""
        with self._lock:
            return self._buffer_bytes

    def get(self, digest: str) -> Buffer:
        """The chunk's bytes, unverified; ChunkMissing if the store does not hold it."""
        while True:
            with self._lock:
                self._used = time.monotonic()
                if self._idle_timer is None:
                    self._watch_idle(self.idle_s)
                data = self._held.get(digest)
                if data is not None:
                    self._held.move_to_end(digest)
                    return data
                loading = self._loading.get(digest)
                if loading is None:
                    mine = self._loading[digest] = threading.Event()
                    break
            loading.wait()  # another thread is reading it: then it is held (or failed, and this one tries)
        evicted = []
        try:
            data = self.store.load(digest, self._buffer)
            with self._lock:
                self.loads += 1
                self._held[digest] = data
                self._held_bytes += len(data)
                while self._held_bytes > self.capacity and len(self._held) > 1:
                    evicted.append(self._held.popitem(last=False)[1])
                    self._held_bytes -= len(evicted[-1])
        finally:
            with self._lock:
                del self._loading[digest]
            mine.set()
        del evicted  # their buffers come back once no answer is sending them either
        return data

    def release(self) -> None:
        """Let every held chunk and spare buffer go (buffers still in answers go when those end)."""
        with self._lock:
            released, self._held = self._held, OrderedDict()
            self._held_bytes = 0
            for spare in self._free.values():
                self._buffer_bytes -= sum(len(raw) for raw in spare)
            self._free.clear()
        del released  # outside the lock: their finalizers take it

    def _watch_idle(self, after: float) -> None:
        """(Under the lock.) Look again in ``after`` seconds whether downloads have stopped."""
        self._idle_timer = threading.Timer(after, self._check_idle)
        self._idle_timer.daemon = True  # never keeps the process from exiting
        self._idle_timer.start()

    def _check_idle(self) -> None:
        with self._lock:
            quiet = time.monotonic() - self._used
            if quiet < self.idle_s:
                self._watch_idle(self.idle_s - quiet)
                return
            self._idle_timer = None
        self.release()

    def _buffer(self, size: int) -> memoryview:
        """``size`` writable, page-aligned bytes in a buffer that comes back when no view of them is left."""
        bucket = -(-size // _STEP) * _STEP
        with self._lock:
            free = self._free.get(bucket)
            raw = free.pop() if free else None
            if raw is None:
                self._buffer_bytes += len(raw := bytearray(bucket + PAGE))
                self.allocated += 1
        exporter = (ctypes.c_char * size).from_buffer(raw, page_skip(raw))
        weakref.finalize(exporter, self._give_back, raw, bucket).atexit = False  # nothing to give back at exit
        return memoryview(exporter).cast("B")

    def _give_back(self, raw: bytearray, bucket: int) -> None:
        with self._lock:
            spare = self._free.setdefault(bucket, [])
            # let it go once released (idle: nothing is being served that would take it), or past
            # the spares (it was allocated while many were being sent)
            if self._held and (len(spare) < SPARE_BUFFERS or (len(spare) + 1) * len(raw) <= self.capacity // 8):
                spare.append(raw)
            else:
                self._buffer_bytes -= len(raw)
