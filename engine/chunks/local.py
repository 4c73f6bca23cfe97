"""The on-disk chunk store: append-only pack files plus an index (digest -> pack, offset, length).

Layout of a store directory::

    packs/pack-000001.pack   records: b"FLC1", u32 length, 32-byte digest, the bytes;
                             or, block-headed, b"FLC2", u32 length, 32-byte digest, zeros to
                             the next 4 KiB, the bytes; zeros pad up to a direct record
    index.db                 SQLite: chunks(digest, pack, offset, length)
    LOCK                     held (flock) by the one process using the store

A ``put`` appends the record to the current pack and adds its index row inside an
open transaction; ``sync`` fsyncs the pack, then commits the index, so the index
never names bytes that are not on disk. This is the acknowledgement boundary: many
chunks per fsync instead of one each. Chunks written but not yet synced when the
process died are not lost either: at open, the tail of each pack past its last
indexed record is scanned, every record whose bytes still hash to their digest is
indexed, and the file is cut at the first torn record. Reads verify the digest; a
corrupt copy is dropped from the index (and so fetched again), never returned.

Written bytes are handed to the disk every ``KICK_BYTES`` (``sync_file_range``, which
starts writeback without waiting for it), so the disk writes while the chunks still
arrive and the fsync at the acknowledgement finds little left to do (4 receivers of
``tools/bench/stream.py --quick`` on a 2-core machine: 0.73-0.83 GiB/s with it,
0.65-0.73 without, in 4 paired runs).

Chunks put with ``cache=False`` (a receiver that filled its tensors from the bytes in
hand and keeps them only to have them) of at least ``DIRECT_MIN`` bytes are written
around the page cache (``O_DIRECT``). A buffered write copies every byte into page-cache
pages the kernel must first find; on virtual machines that hand idle memory back to the
host, those are fresh host memory, faulted in page by page, and the copy then cost ~1
CPU-s/GiB (``tools/bench/stream.py``: the kernel's page-cache copy was 31% of all CPU
while 4 receivers stored a model). Bytes that will be read soon (what a server serves or
aggregates, a site's own results) stay buffered: reading a direct record back is a disk
read. So do chunks under ``DIRECT_MIN`` (many small chunks waste no space) and every
chunk on a filesystem that refuses ``O_DIRECT`` (tmpfs).

A direct record starts on a ``DIRECT_ALIGN`` boundary, with zeros before it that the
tail scan steps over. When the bytes lie on a boundary in memory, in whole blocks (a
receiver reads its answers into aligned buffers), the record is block-headed: a header
block (``b"FLC2"``, the length, the digest, zeros), then the bytes, written from where
they are. Otherwise the record (header, bytes, zeros) is assembled in a reused staging
buffer. The pack is extended ahead of direct writes in ``PREALLOCATE`` steps
(``fallocate``): a direct write that grows a file takes the file's lock exclusively and
waits (ext4), and writers spun on it (5% of all CPU in ``tools/bench/stream.py``), while
writes inside the file share it. The zeros past the last record are cut when the pack is
rolled or closed, and by the tail scan after a crash.

Synced pack bytes older than the newest ``cache_window`` are dropped from the page
cache (``posix_fadvise(DONTNEED)``): a store writes a model-sized payload per round
and reads most of it at most once, soon after writing it. Left cached, the packs
grow the page cache by every payload, and each new cache page is memory the kernel
must find and fill (on virtual machines that hand idle memory back to the host, a
fresh page costs ~10x a recycled one: writing a new file measured 330 MB/s against
4-5 GB/s into recycled pages). Dropped pages are clean (already fsynced) and are
recycled by the next writes; a read of an old chunk comes from disk.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import mmap
import os
import sqlite3
import struct
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from engine.chunks.base import (
    PAGE,
    Buffer,
    ChunkStat,
    ChunkStore,
    check_digest,
    hash_bytes,
    page_aligned,
)
from engine.errors import ChunkError, ChunkIntegrityError, ChunkMissing

__all__ = ["LocalChunkStore"]

MAGIC = b"FLC1"
#: a block-headed record: the header fills a whole DIRECT_ALIGN block, the bytes start on the next
BLOCK_MAGIC = b"FLC2"
_HEADER = struct.Struct("<4sI32s")
#: start a new pack file past this size
PACK_LIMIT = 256 << 20
#: synced pack bytes kept in the page cache behind the write position (see the module docstring)
CACHE_WINDOW = 96 << 20
#: chunks of at least this many bytes are written with O_DIRECT (see the module docstring)
DIRECT_MIN = 256 << 10
#: O_DIRECT records start at multiples of this
DIRECT_ALIGN = PAGE
#: the current pack is extended ahead of direct writes by this much at a time (see the module docstring)
PREALLOCATE = 32 << 20
#: written pack bytes are handed to the disk (writeback started, not waited for) in steps of this size
KICK_BYTES = 8 << 20
_SYNC_FILE_RANGE_WRITE = 2  # from <fcntl.h>: start writeback of the range's dirty pages, do not wait


def _libc(name: str, *argtypes: type) -> Callable[..., int] | None:
    """The C library's function ``name`` (the library this process runs on), or None where it has none."""
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = list(argtypes)
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


@functools.cache
def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's ``sync_file_range`` (Linux only; Python does not wrap it), or None."""
    return _libc("sync_file_range", ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)


def _align_up(n: int) -> int:
    return -(-n // DIRECT_ALIGN) * DIRECT_ALIGN


def _direct_fd(path: Path, mode: int = os.O_WRONLY) -> int:
    """An O_DIRECT descriptor of ``path`` (write-only unless told), or -1 where the OS or filesystem has none."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return -1
    try:
        return os.open(path, mode | flag)
    except OSError as exc:
        if exc.errno == errno.EINVAL:  # the filesystem does not do direct I/O
            return -1
        raise


@functools.cache
def _fallocate() -> Callable[[int, int, int, int], int] | None:
    """libc's ``fallocate`` (Linux only; ``os.posix_fallocate`` writes zeros where it is missing), or None."""
    return _libc("fallocate", ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [("nr_cache", ctypes.c_uint64), ("nr_dirty", ctypes.c_uint64), ("nr_writeback", ctypes.c_uint64),
                ("nr_evicted", ctypes.c_uint64), ("nr_recently_evicted", ctypes.c_uint64)]


_CACHESTAT = 451  # the syscall's number (Linux 6.5; the same on every architecture's generic table)


@functools.cache
def _syscall() -> Callable[..., int] | None:
    """libc's ``syscall`` on Linux (the numbers below are Linux's), else None."""
    if not sys.platform.startswith("linux"):
        return None
    return _libc("syscall", ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint)


def _all_cached(fd: int, offset: int, length: int) -> bool:
    """True if the file's pages over ``offset:offset+length`` are all in the page cache (``cachestat``).

    Asked without reading: a read that stops where the cache does (``RWF_NOWAIT``) still
    starts readahead into the cache. False where the kernel cannot tell (before 6.5).
    """
    syscall = _syscall()
    if syscall is None or length <= 0:
        return False
    first = offset - offset % PAGE
    span = _CachestatRange(first, offset + length - first)
    stat = _Cachestat()
    if syscall(_CACHESTAT, fd, ctypes.addressof(span), ctypes.addressof(stat), 0) != 0:
        return False
    return bool(stat.nr_cache * PAGE >= _align_up(offset + length) - first)


def _read_direct(dfd: int, into: memoryview, offset: int) -> int:
    """Read ``into`` (page-aligned, whole pages) from the O_DIRECT ``dfd`` at the aligned ``offset``;
    return the bytes read (fewer at the end of the file; 0 if the filesystem refuses)."""
    got = 0
    while got < len(into):
        try:
            n = os.preadv(dfd, [into[got:]], offset + got)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                return got
            raise
        if n <= 0:
            break
        got += n
    return got


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Let the disk start writing ``length`` bytes at ``offset`` now rather than at the next fsync."""
    fn = _sync_file_range()
    if fn is not None:
        fn(fd, offset, length, _SYNC_FILE_RANGE_WRITE)  # a failure only means the fsync does it all


Progress = Callable[[int, int], None]


class LocalChunkStore(ChunkStore):
    """Chunks in pack files under ``directory`` (created if needed)."""

    def __init__(self, directory: str | Path, *, pack_limit: int = PACK_LIMIT,
                 cache_window: int = CACHE_WINDOW, direct: bool = True) -> None:
        """``direct=False`` writes even ``cache=False`` chunks through the page cache (module docstring)."""
        self.directory = Path(directory)
        self.packs_dir = self.directory / "packs"
        self.packs_dir.mkdir(parents=True, exist_ok=True)
        self.pack_limit = pack_limit
        self.cache_window = cache_window
        self.direct = direct
        #: page-aligned buffers direct records are assembled in (one per concurrent writer, reused)
        self._staging: list[mmap.mmap] = []
        self._lock = threading.RLock()
        #: direct writes run outside the lock; these track them (see ``put``)
        self._written = threading.Condition(self._lock)
        self._writing: set[str] = set()
        self._lock_fd = os.open(self.directory / "LOCK", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise ChunkError(f"another process is using the chunk store {self.directory}") from None
        self._db = sqlite3.connect(self.directory / "index.db", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("CREATE TABLE IF NOT EXISTS chunks (digest TEXT PRIMARY KEY, pack TEXT NOT NULL, "
                         "offset INTEGER NOT NULL, length INTEGER NOT NULL) WITHOUT ROWID")
        # how far each pack was synced: the tail scan starts there, so deleted records stay deleted
        self._db.execute("CREATE TABLE IF NOT EXISTS packs (name TEXT PRIMARY KEY, synced_end INTEGER NOT NULL)")
        self._readers: dict[str, int] = {}
        #: O_DIRECT read descriptors of packs that ``load`` read around the page cache (-1: none)
        self._direct_readers: dict[str, int] = {}
        self._in_tx = False
        self._dirty = False
        self.recovered = self._recover_tails()
        self._pack, self._fd, self._size = self._open_current()
        self._dfd = self._open_direct()
        #: the current pack's file size (past ``_size`` when extended ahead of direct writes)
        self._allocated = self._size
        #: the current pack's bytes before this offset were dropped from the page cache
        self._uncached = 0
        #: the current pack's bytes before this offset were handed to the disk's writeback
        self._kicked = self._size

    # -- files -----------------------------------------------------------------------------

    def _pack_names(self) -> list[str]:
        return sorted(p.name for p in self.packs_dir.glob("pack-*.pack"))

    def _open_current(self) -> tuple[str, int, int]:
        names = self._pack_names()
        name = names[-1] if names else "pack-000001.pack"
        fd = os.open(self.packs_dir / name, os.O_WRONLY | os.O_CREAT, 0o600)
        return name, fd, os.fstat(fd).st_size

    def _open_direct(self) -> int:
        return _direct_fd(self.packs_dir / self._pack) if self.direct else -1

    def _cut(self) -> None:
        """Drop the current pack's zeros past its last record (extended ahead of direct writes)."""
        if self._allocated > self._size:
            os.ftruncate(self._fd, self._size)
            self._allocated = self._size

    def _roll(self) -> None:
        self._begin()
        self._db.execute("INSERT OR REPLACE INTO packs VALUES (?, ?)", (self._pack, self._size))
        self._cut()
        os.fsync(self._fd)
        self._uncache(self._size)
        os.close(self._fd)
        if self._dfd >= 0:
            os.close(self._dfd)
        number = int(self._pack[5:11]) + 1
        self._pack = f"pack-{number:06d}.pack"
        self._fd = os.open(self.packs_dir / self._pack, os.O_WRONLY | os.O_CREAT, 0o600)
        self._dfd = self._open_direct()
        self._size = self._uncached = self._kicked = self._allocated = 0

    def _append(self, header: bytes, data: Buffer) -> int:
        """Write one record through the page cache at the end of the current pack; return where its bytes start."""
        offset = self._size + _HEADER.size
        os.pwritev(self._fd, [header, data], self._size)
        self._size += _HEADER.size + len(data)
        self._allocated = max(self._allocated, self._size)
        if self._size - self._kicked >= KICK_BYTES:
            _start_writeback(self._fd, self._kicked, self._size - self._kicked)
            self._kicked = self._size
        return offset

    def _reserve(self, length: int, blocked: bool) -> tuple[int, int]:
        """Claim the aligned span of a direct record of ``length`` bytes at the end of the current pack."""
        start = _align_up(self._size)
        if start > self._size:  # zeros up to the boundary (through the page cache: part of a block)
            os.pwrite(self._fd, bytes(start - self._size), self._size)
        self._size = start + DIRECT_ALIGN + length if blocked else _align_up(start + _HEADER.size + length)
        if self._size > self._allocated:
            fn = _fallocate()
            step = min(PREALLOCATE, max(self.pack_limit - self._allocated, 0))
            if fn is not None and fn(self._fd, 0, self._allocated, self._size - self._allocated + step) == 0:
                self._allocated = self._size + step
            else:
                self._allocated = self._size  # the direct write grows the file itself
        return start, self._size

    def _write_direct(self, fds: tuple[int, int], start: int, end: int, digest: str, data: Buffer,
                      staging: mmap.mmap | None, blocked: bool) -> mmap.mmap:
        """Write a record around the page cache (``fds``: the pack's direct and buffered descriptors).

        Block-headed, the header block is made in the staging buffer and the bytes go from
        where they are; otherwise the record (header, bytes, zero padding) is assembled there.
        """
        size = end - start
        if staging is None or len(staging) < (DIRECT_ALIGN if blocked else size):
            staging = mmap.mmap(-1, max(size, (1 << 20) + DIRECT_ALIGN))
        raw = bytes.fromhex(digest)
        with memoryview(staging) as whole:
            if blocked:
                staging[:DIRECT_ALIGN] = _HEADER.pack(BLOCK_MAGIC, len(data), raw).ljust(DIRECT_ALIGN, b"\0")
                parts = [whole[:DIRECT_ALIGN], memoryview(data)]
            else:
                staging[:_HEADER.size] = _HEADER.pack(MAGIC, len(data), raw)
                staging[_HEADER.size:_HEADER.size + len(data)] = data
                staging[_HEADER.size + len(data):size] = bytes(size - _HEADER.size - len(data))
                parts = [whole[:size]]
            try:
                os.pwritev(fds[0], parts, start)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                # the filesystem opened the file for direct I/O but wants other alignment: through the cache
                os.pwritev(fds[1], parts, start)
            finally:
                parts.clear()
        return staging

    def _wait_writes(self) -> None:
        """Wait (the lock held on entry and on return) until no direct write is in flight."""
        while self._writing:
            self._written.wait()

    def _uncache(self, end: int) -> None:
        """Drop the current pack's synced bytes before ``end`` from the page cache (they are on disk)."""
        if end > self._uncached and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._fd, self._uncached, end - self._uncached, os.POSIX_FADV_DONTNEED)
            self._uncached = end

    def _reader(self, pack: str) -> int:
        fd = self._readers.get(pack)
        if fd is None:
            fd = self._readers[pack] = os.open(self.packs_dir / pack, os.O_RDONLY)
        return fd

    def _recover_tails(self) -> int:
        """Index the records written after the last sync (found intact), cut torn ones; return how many."""
        found = 0
        self._db.execute("BEGIN")
        for name in self._pack_names():
            path = self.packs_dir / name
            row = self._db.execute("SELECT synced_end FROM packs WHERE name = ?", (name,)).fetchone()
            pos = row[0] if row else 0
            size = path.stat().st_size
            with open(path, "r+b") as fh:
                while pos < size:
                    fh.seek(pos)
                    head = fh.read(_HEADER.size)
                    if len(head) < _HEADER.size:
                        break
                    if head[0] == 0 and pos % DIRECT_ALIGN:  # padding before a direct record?
                        fh.seek(pos)
                        pad = _align_up(pos) - pos
                        if fh.read(pad) != bytes(pad):
                            break
                        pos += pad
                        continue
                    magic, length, raw = _HEADER.unpack(head)
                    skip = DIRECT_ALIGN if magic == BLOCK_MAGIC and pos % DIRECT_ALIGN == 0 else _HEADER.size
                    fh.seek(pos + skip)
                    data = fh.read(length)
                    if magic not in (MAGIC, BLOCK_MAGIC) or len(data) < length or hash_bytes(data) != raw.hex():
                        break
                    self._db.execute("INSERT OR IGNORE INTO chunks VALUES (?, ?, ?, ?)",
                                     (raw.hex(), name, pos + skip, length))
                    found += 1
                    pos += skip + length
                if pos < size:
                    fh.truncate(pos)
                    fh.flush()
                    os.fsync(fh.fileno())
            self._db.execute("INSERT OR REPLACE INTO packs VALUES (?, ?)", (name, pos))
        self._db.execute("COMMIT")
        return found

    # -- the interface ------------------------------------------------------------------------

    def _begin(self) -> None:
        if not self._in_tx:
            self._db.execute("BEGIN")
            self._in_tx = True

    def missing(self, digests: Iterable[str]) -> list[str]:
        wanted = [check_digest(d) for d in dict.fromkeys(digests)]
        out: list[str] = []
        with self._lock:
            for i in range(0, len(wanted), 500):
                part = wanted[i:i + 500]
                marks = ",".join("?" * len(part))
                held = {r[0] for r in self._db.execute(f"SELECT digest FROM chunks WHERE digest IN ({marks})", part)}
                out.extend(d for d in part if d not in held)
        return out

    def put(self, digest: str, data: Buffer, *, verified: bool = False, cache: bool = True) -> bool:
        """Store a chunk; False if it was held already.

        A direct record's span is claimed under the lock and written outside it, so the
        writers of a store (a receiver's requests in flight) wait on the disk side by
        side; its index row is added once its bytes are written, and ``sync`` waits for
        the writes in flight, so the index never names bytes that are not on disk.
        """
        self._check_put(digest, data, verified)
        with self._lock:
            while True:
                while digest in self._writing:  # the same chunk, being written by another caller
                    self._written.wait()
                if self._db.execute("SELECT 1 FROM chunks WHERE digest = ?", (digest,)).fetchone():
                    return False
                if not (self._size and self._size + len(data) > self.pack_limit):
                    break
                if not self._writing:
                    self._roll()
                    break
                self._written.wait()  # the full pack is closed once its writes are done
            if cache or self._dfd < 0 or len(data) < DIRECT_MIN:
                header = _HEADER.pack(MAGIC, len(data), bytes.fromhex(digest))
                self._add(digest, self._pack, self._append(header, data), len(data))
                return True
            fds, pack = (self._dfd, self._fd), self._pack
            blocked = page_aligned(data)
            start, end = self._reserve(len(data), blocked)
            self._writing.add(digest)
            staging = self._staging.pop() if self._staging else None
        written = False
        try:
            staging = self._write_direct(fds, start, end, digest, data, staging, blocked)
            written = True
        finally:
            with self._lock:
                self._writing.discard(digest)
                if staging is not None:
                    self._staging.append(staging)
                if written:
                    self._add(digest, pack, start + (DIRECT_ALIGN if blocked else _HEADER.size), len(data))
                self._written.notify_all()
        return True

    def _add(self, digest: str, pack: str, offset: int, length: int) -> None:
        self._begin()
        self._db.execute("INSERT INTO chunks VALUES (?, ?, ?, ?)", (digest, pack, offset, length))
        self._dirty = True

    def load(self, digest: str, buffer: Callable[[int], memoryview]) -> memoryview:
        found = self._found(digest)
        assert found.pack is not None
        start = found.offset - found.offset % DIRECT_ALIGN
        skip, end = found.offset - start, found.offset - start + found.length  # the chunk within the span
        into = buffer(_align_up(found.offset + found.length) - start)
        with self._lock:  # duplicates, read outside the lock: compaction may close the originals meanwhile
            fd = os.dup(self._reader(found.pack))
            dfd = self._direct_reader(found.pack)
            dfd = os.dup(dfd) if dfd >= 0 else -1
        try:
            # in the page cache: copied from there; else read around it, into the caller's memory
            got = _read_direct(dfd, into, start) if dfd >= 0 and not _all_cached(fd, found.offset, found.length) else 0
            if got < end:
                got = skip + os.preadv(fd, [into[skip:end]], found.offset)
        finally:
            os.close(fd)
            if dfd >= 0:
                os.close(dfd)
        if got < end:
            raise self._refuse(found)
        return into[skip:end]

    def _direct_reader(self, pack: str) -> int:
        """A read-only O_DIRECT descriptor of ``pack`` (kept open), or -1 where there is none."""
        fd = self._direct_readers.get(pack)
        if fd is None:
            fd = self._direct_readers[pack] = _direct_fd(self.packs_dir / pack, os.O_RDONLY) if self.direct else -1
        return fd

    def _close_readers(self, pack: str) -> None:
        for readers in (self._readers, self._direct_readers):
            fd = readers.pop(pack, -1)
            if fd >= 0:
                os.close(fd)

    def sync(self) -> None:
        with self._lock:
            self._wait_writes()
            if not self._dirty and not self._in_tx:
                return
            # the bulk of the fsync runs without the lock (unless the caller holds it), so puts go
            # on meanwhile: a receiver's other requests keep arriving while it acknowledges a
            # batch. On a copy of the descriptor, since a roll may close the pack's own meanwhile.
            fd, pack, size = os.dup(self._fd), self._pack, self._size
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        with self._lock:
            if self._fd < 0 or not (self._dirty or self._in_tx):
                return  # closed meanwhile (close syncs first), or another sync committed it all
            self._wait_writes()  # the ones that began during the fsync
            if self._pack != pack or self._size != size:
                os.fsync(self._fd)  # what was put during the first fsync (a roll synced the old pack)
            # every byte the index rows name is on disk now
            self._begin()
            self._db.execute("INSERT OR REPLACE INTO packs VALUES (?, ?)", (self._pack, self._size))
            self._db.execute("COMMIT")
            self._in_tx = False
            self._dirty = False
            if self._size - self._uncached > self.cache_window:
                self._uncache(self._size - self.cache_window)

    def stat(self, digest: str) -> ChunkStat | None:
        with self._lock:
            row = self._db.execute("SELECT pack, offset, length FROM chunks WHERE digest = ?",
                                   (check_digest(digest),)).fetchone()
        return None if row is None else ChunkStat(digest, row[2], row[0], row[1])

    def _found(self, digest: str) -> ChunkStat:
        found = self.stat(digest)
        if found is None:
            raise ChunkMissing(digest, f"the chunk store {self.directory}")
        assert found.pack is not None
        return found

    def _refuse(self, found: ChunkStat) -> ChunkIntegrityError:
        """Drop a copy that failed its check from the index; the error to raise (it is never used)."""
        self._drop(found.digest)
        return ChunkIntegrityError(found.digest, f"the copy in {found.pack} at {found.offset} is corrupt; "
                                                 "it was dropped from the index and must be fetched again")

    def get(self, digest: str, *, verify: bool = True) -> bytes:
        found = self._found(digest)
        assert found.pack is not None
        with self._lock:
            data = os.pread(self._reader(found.pack), found.length, found.offset)
        if len(data) != found.length or (verify and hash_bytes(data) != digest):
            raise self._refuse(found)
        return data

    def read_into(self, digest: str, target: Buffer) -> int:
        found = self._found(digest)
        assert found.pack is not None
        into = memoryview(target).cast("B")
        if len(into) != found.length:
            return found.length
        with self._lock:  # as in get: compaction does not close the pack under the read
            got = os.preadv(self._reader(found.pack), [into], found.offset)
        if got != found.length or hash_bytes(into) != digest:
            raise self._refuse(found)
        return found.length

    def _drop(self, digest: str) -> None:
        with self._lock:
            self._begin()
            self._db.execute("DELETE FROM chunks WHERE digest = ?", (digest,))
            self.sync()

    def digests(self) -> Iterator[str]:
        with self._lock:
            rows = self._db.execute("SELECT digest FROM chunks").fetchall()
        return iter(r[0] for r in rows)

    def delete(self, digests: Iterable[str]) -> int:
        count = 0
        with self._lock:
            self._begin()
            for d in digests:
                count += self._db.execute("DELETE FROM chunks WHERE digest = ?", (d,)).rowcount
            self.sync()
        return count

    # -- maintenance ------------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Chunks and bytes held, and the bytes of the pack files (the difference is reclaimable)."""
        with self._lock:
            chunks, held = self._db.execute("SELECT count(*), coalesce(sum(length), 0) FROM chunks").fetchone()
        on_disk = sum(p.stat().st_size for p in self.packs_dir.glob("pack-*.pack"))
        return {"chunks": int(chunks), "bytes": int(held), "pack_bytes": on_disk,
                "packs": len(self._pack_names())}

    def verify_all(self, progress: Progress | None = None) -> list[str]:
        """Re-hash every chunk; return (and drop from the index) the corrupt ones."""
        bad = []
        all_digests = list(self.digests())
        for i, digest in enumerate(all_digests, 1):
            try:
                self.get(digest)
            except ChunkIntegrityError:
                bad.append(digest)
            if progress is not None:
                progress(i, len(all_digests))
        return bad

    def compact(self, progress: Progress | None = None) -> int:
        """Rewrite packs that are mostly garbage, keeping their live chunks; return bytes reclaimed."""
        reclaimed = 0
        with self._lock:
            self.sync()
            names = [n for n in self._pack_names() if n != self._pack]
            for i, name in enumerate(names, 1):
                size = (self.packs_dir / name).stat().st_size
                live = self._db.execute("SELECT digest, offset, length FROM chunks WHERE pack = ?", (name,)).fetchall()
                live_bytes = sum(r[2] + _HEADER.size for r in live)
                if live_bytes * 2 > size:
                    continue
                fd = self._reader(name)
                self._begin()
                for digest, offset, length in live:
                    data = os.pread(fd, length, offset)
                    self._db.execute("DELETE FROM chunks WHERE digest = ?", (digest,))
                    self.put(digest, data)
                self.sync()
                self._close_readers(name)
                (self.packs_dir / name).unlink()
                self._begin()
                self._db.execute("DELETE FROM packs WHERE name = ?", (name,))
                self.sync()
                reclaimed += size - live_bytes
                if progress is not None:
                    progress(i, len(names))
        return reclaimed

    def close(self) -> None:
        with self._lock:
            if self._fd < 0:
                return
            self.sync()
            self._cut()
            os.close(self._fd)
            self._fd = -1
            if self._dfd >= 0:
                os.close(self._dfd)
                self._dfd = -1
            for pack in list(self._readers) + list(self._direct_readers):
                self._close_readers(pack)
            self._db.close()
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
