"""The chunk store contract, on the memory and the local (pack file) store, and the local store's crash safety."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.chunks import ChunkStore, LocalChunkStore, MemoryChunkStore, hash_bytes
from engine.chunks.base import MAX_CHUNK_BYTES
from engine.errors import ChunkError, ChunkIntegrityError, ChunkMissing


@pytest.fixture(params=["memory", "local"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ChunkStore]:
    s: ChunkStore = MemoryChunkStore() if request.param == "memory" else LocalChunkStore(tmp_path / "chunks")
    yield s
    s.close()


def chunk(n: int, size: int = 1000) -> tuple[str, bytes]:
    data = bytes((n + i) % 251 for i in range(size))
    return hash_bytes(data), data


def test_put_get_missing_stat(store: ChunkStore) -> None:
    (a, da), (b, db) = chunk(1), chunk(2, 5000)
    assert store.missing([a, b, a]) == [a, b]
    assert store.put(a, da) is True and store.put(a, da) is False
    store.sync()
    assert store.missing([a, b]) == [b]
    assert store.get(a) == da
    stat = store.stat(a)
    assert stat is not None and stat.length == len(da) and store.stat(b) is None
    with pytest.raises(ChunkMissing, match=b):
        store.get(b)
    store.put(b, memoryview(db))
    assert sorted(store.digests()) == sorted([a, b])
    assert store.delete([a, b, a]) == 2 and store.missing([a, b]) == [a, b]


def test_bad_chunks_are_refused_and_nothing_is_stored(store: ChunkStore) -> None:
    a, da = chunk(3)
    with pytest.raises(ChunkIntegrityError) as err:
        store.put(a, da + b"x")
    assert err.value.digest == a
    for bad in ("ABC", a.upper(), a[:-1], a + "0", "z" * 64, 42):
        with pytest.raises(ChunkError, match="64 lower-case hex digits"):
            store.put(bad, da)  # type: ignore[arg-type]
        with pytest.raises(ChunkError):
            store.missing([bad])  # type: ignore[list-item]
    big = b"\0" * (MAX_CHUNK_BYTES + 1)
    with pytest.raises(ChunkError, match="the limit is"):
        store.put(hash_bytes(big), big)
    assert list(store.digests()) == []


@pytest.mark.parametrize("read", ["get", "read_into"])
def test_a_corrupt_copy_is_never_returned_and_is_dropped(read: str, tmp_path: Path) -> None:
    store = LocalChunkStore(tmp_path / "c")
    a, da = chunk(4)
    store.put(a, da)
    store.sync()
    stat = store.stat(a)
    assert stat is not None and stat.pack is not None
    with open(store.packs_dir / stat.pack, "r+b") as fh:
        fh.seek(stat.offset + 10)
        fh.write(b"\xff")
    with pytest.raises(ChunkIntegrityError, match="dropped from the index"):
        store.get(a) if read == "get" else store.read_into(a, bytearray(len(da)))
    assert store.missing([a]) == [a]  # to be fetched again
    assert store.put(a, da) is True and store.get(a) == da
    store.close()


def test_read_into_fills_the_callers_buffer_verified_and_leaves_a_wrong_sized_one_alone(store: ChunkStore) -> None:
    (a, da), (b, _) = chunk(5, 3000), chunk(6)
    store.put(a, da)
    store.sync()
    target = bytearray(len(da) + 10)
    assert store.read_into(a, memoryview(target)[5:5 + len(da)]) == len(da)
    assert bytes(target[5:5 + len(da)]) == da and target[:5] == b"\0" * 5
    short = bytearray(len(da) - 1)
    assert store.read_into(a, short) == len(da)  # the caller names the mismatch
    assert short == bytearray(len(da) - 1)
    with pytest.raises(ChunkMissing, match=b):
        store.read_into(b, bytearray(1000))


def test_serving_without_rehashing_hands_over_the_stored_bytes_for_the_peer_to_check(tmp_path: Path) -> None:
    from engine.chunks.base import verify

    store = LocalChunkStore(tmp_path / "c")
    a, da = chunk(4)
    store.put(a, da)
    store.sync()
    stat = store.stat(a)
    assert stat is not None and stat.pack is not None
    assert store.get(a, verify=False) == da
    with open(store.packs_dir / stat.pack, "r+b") as fh:
        fh.seek(stat.offset + 10)
        fh.write(b"\xff")
    served = store.get(a, verify=False)  # what the chunk route sends; the receiving site verifies it
    with pytest.raises(ChunkIntegrityError):
        verify(a, served)
    with pytest.raises(ChunkIntegrityError):
        store.get(a)  # any use here still re-hashes and drops the bad copy
    store.close()


def test_load_reads_the_stored_bytes_as_packs_grow_roll_and_are_compacted(tmp_path: Path) -> None:
    from engine.chunks.base import page_aligned_buffer

    store = LocalChunkStore(tmp_path / "c", pack_limit=120_000)
    chunks = [chunk(n, 50_000) for n in range(9)]
    loaded = []
    for d, data in chunks:  # each put grows the current pack; every other one starts a new pack
        store.put(d, data)
        loaded.append(store.load(d, page_aligned_buffer))
        assert loaded[-1] == data
    assert store.stats()["packs"] >= 3
    store.sync()
    store.delete([d for d, _ in chunks[:6]])
    store.compact()  # rewrites and unlinks the old packs: what was loaded before is the caller's
    assert all(v == data for v, (_, data) in zip(loaded, chunks, strict=True))
    assert all(store.load(d, page_aligned_buffer) == data for d, data in chunks[6:])
    with pytest.raises(ChunkMissing):
        store.load(chunks[0][0], page_aligned_buffer)
    store.close()


def test_a_sync_fsyncs_without_blocking_puts_and_covers_what_was_put_meanwhile(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Puts go on during a sync's fsync; what they wrote is fsynced again before the index names it."""
    import threading

    store = LocalChunkStore(tmp_path / "c")
    (a, da), (b, db) = chunk(1), chunk(2)
    store.put(a, da)
    real_fsync = os.fsync
    synced_sizes = []

    def fsync(fd: int) -> None:
        if not synced_sizes:  # during the first fsync, another thread puts a chunk (it must not block)
            putter = threading.Thread(target=store.put, args=(b, db))
            putter.start()
            putter.join(timeout=10)
            assert not putter.is_alive(), "a put waited for the fsync"
        real_fsync(fd)
        synced_sizes.append(os.fstat(fd).st_size)

    monkeypatch.setattr(os, "fsync", fsync)
    store.sync()
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert len(synced_sizes) == 2, "what was put during the first fsync was not fsynced before the commit"
    store.close()
    with LocalChunkStore(tmp_path / "c") as again:
        assert again.recovered == 0 and again.missing([a, b]) == []  # both indexed by the sync, none by the scan


def test_written_bytes_are_handed_to_the_disk_in_steps_before_the_fsync(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.chunks import local

    assert local._sync_file_range() is not None  # Linux: the call exists
    started: list[tuple[int, int]] = []
    monkeypatch.setattr(local, "_start_writeback", lambda fd, offset, length: started.append((offset, length)))
    store = LocalChunkStore(tmp_path / "c", pack_limit=1 << 30)
    step = local.KICK_BYTES
    chunks = [(hash_bytes(d), d) for d in (os.urandom(3 << 20) for _ in range(7))]  # 21 MiB
    for digest, data in chunks:
        store.put(digest, data)
    # contiguous ranges from the start, each at least a step, covering all but the last partial step
    assert started and started[0][0] == 0
    assert all(a + n == b for (a, n), (b, _) in zip(started, started[1:], strict=False))
    assert all(n >= step for _, n in started)
    end = started[-1][0] + started[-1][1]
    size = (store.packs_dir / "pack-000001.pack").stat().st_size
    assert size - step < end <= size
    store.close()


def test_only_one_process_uses_a_store(tmp_path: Path) -> None:
    first = LocalChunkStore(tmp_path / "c")
    with pytest.raises(ChunkError, match="another process"):
        LocalChunkStore(tmp_path / "c")
    first.close()
    LocalChunkStore(tmp_path / "c").close()


WRITER = """
import os, signal, sys
from engine.chunks import LocalChunkStore, hash_bytes
store = LocalChunkStore(sys.argv[1])
for n in range(int(sys.argv[2])):
    data = bytes([n % 256]) * 70000
    store.put(hash_bytes(data), data)
    if n == int(sys.argv[3]):
        store.sync()
print("written", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_chunks_written_after_the_last_sync_survive_a_kill(tmp_path: Path) -> None:
    """A SIGKILLed writer's unsynced chunks are found at the next open (the pack tail is rescanned)."""
    proc = subprocess.run([sys.executable, "-c", WRITER, str(tmp_path / "c"), "10", "3"], capture_output=True)
    assert proc.returncode == -signal.SIGKILL and b"written" in proc.stdout
    store = LocalChunkStore(tmp_path / "c")
    assert store.recovered == 6
    digests = [hash_bytes(bytes([n]) * 70000) for n in range(10)]
    assert store.missing(digests) == []
    assert all(store.get(d) == bytes([n]) * 70000 for n, d in enumerate(digests))
    store.close()


def test_a_torn_record_is_cut_and_the_intact_ones_kept(tmp_path: Path) -> None:
    store = LocalChunkStore(tmp_path / "c")
    a, da = chunk(5)
    store.put(a, da)
    store.sync()
    store.close()
    pack = next((tmp_path / "c" / "packs").glob("*.pack"))
    size = pack.stat().st_size
    b, db = chunk(6)
    with open(pack, "ab") as fh:  # a record whose bytes were cut short by the crash
        fh.write(b"FLC1" + len(db).to_bytes(4, "little") + bytes.fromhex(b) + db[:100])
    reopened = LocalChunkStore(tmp_path / "c")
    assert reopened.recovered == 0 and pack.stat().st_size == size
    assert reopened.get(a) == da and reopened.missing([b]) == [b]
    assert reopened.put(b, db) and reopened.get(b) == db
    reopened.close()


def test_compaction_reclaims_deleted_chunks(tmp_path: Path) -> None:
    store = LocalChunkStore(tmp_path / "c", pack_limit=200_000)
    chunks = [chunk(n, 50_000) for n in range(12)]
    for d, data in chunks:
        store.put(d, data)
    store.sync()
    assert store.stats()["packs"] >= 3
    store.delete([d for d, _ in chunks[:9]])
    before = store.stats()["pack_bytes"]
    reclaimed = store.compact()
    after = store.stats()
    assert reclaimed > 0 and after["pack_bytes"] == before - reclaimed
    assert after["chunks"] == 3 and all(store.get(d) == data for d, data in chunks[9:])
    store.close()
    assert os.path.exists(tmp_path / "c" / "index.db")


def test_deleted_chunks_stay_deleted_after_a_reopen(tmp_path: Path) -> None:
    """The tail scan starts where the pack was last synced, so a deleted last record is not revived."""
    store = LocalChunkStore(tmp_path / "c")
    (a, da), (b, db) = chunk(7), chunk(8)
    store.put(a, da)
    store.put(b, db)
    store.sync()
    assert store.delete([b]) == 1
    store.close()
    reopened = LocalChunkStore(tmp_path / "c")
    assert reopened.recovered == 0 and reopened.missing([a, b]) == [b]
    reopened.close()


def _resident_bytes(path: Path) -> int:
    """Bytes of ``path`` in the page cache now (mincore over a private mapping of the file)."""
    import ctypes
    import mmap

    size = path.stat().st_size
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    libc = ctypes.CDLL(None, use_errno=True)
    vec = (ctypes.c_ubyte * pages)()
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), size, access=mmap.ACCESS_COPY) as mapped:
        view = (ctypes.c_char * size).from_buffer(mapped)
        try:
            if libc.mincore(ctypes.c_void_p(ctypes.addressof(view)), ctypes.c_size_t(size), vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
        finally:
            del view
    return sum(v & 1 for v in vec) * mmap.PAGESIZE


def test_synced_packs_leave_the_page_cache_behind_a_window_and_still_read_back(tmp_path: Path) -> None:
    window = 1 << 20
    store = LocalChunkStore(tmp_path / "s", cache_window=window)
    chunks = {}
    for i in range(32):
        data = os.urandom(256 << 10)
        chunks[hash_bytes(data)] = data
        store.put(hash_bytes(data), data)
        if i % 4 == 3:
            store.sync()
    pack = next((tmp_path / "s" / "packs").glob("pack-*.pack"))
    assert pack.stat().st_size > 8 * window
    # the window, give or take pages the kernel was still batching: not the 8 MiB written
    assert _resident_bytes(pack) <= 2 * window, _resident_bytes(pack)
    assert all(store.get(d) == data for d, data in chunks.items())  # dropped pages are read from disk
    store.close()
    with LocalChunkStore(tmp_path / "s") as again:
        assert again.missing(chunks) == []



# -- direct (O_DIRECT) records ---------------------------------------------------------------------

MIXED = [70_000, 300_000, 1 << 20, 5, 1 << 20, 1_000_000, 12_345, 777]  # buffered and direct, in turn


def mixed_chunks(seed: int = 0) -> list[tuple[str, bytes]]:
    return [(hash_bytes(d), d) for d in (bytes([(seed + n) % 256]) * size for n, size in enumerate(MIXED))]


def record_starts(store: LocalChunkStore) -> dict[str, int]:
    with store._lock:
        rows = store._db.execute("SELECT digest, offset FROM chunks").fetchall()
    return {d: off - 40 for d, off in rows}  # the index names the bytes; the 40-byte header precedes them


def test_large_uncached_chunks_are_written_around_the_page_cache_on_aligned_records(tmp_path: Path) -> None:
    from engine.chunks import local

    store = LocalChunkStore(tmp_path / "c")
    kept = (hash_bytes(b"k" * (1 << 20)), b"k" * (1 << 20))
    store.put(hash_bytes(b"x" * 13), b"x" * 13)
    store.put(*kept)  # cache=True (the default): through the page cache, packed tight
    assert record_starts(store)[kept[0]] == 53
    assert store._dfd >= 0, "this filesystem refused O_DIRECT; the test needs one that takes it"
    chunks = mixed_chunks()
    for d, data in chunks:
        store.put(d, data, cache=False)
    starts = record_starts(store)
    direct = [d for d, data in chunks if len(data) >= local.DIRECT_MIN]
    assert direct and all(starts[d] % local.DIRECT_ALIGN == 0 for d in direct)
    # a small chunk right after a direct record still starts on its boundary; one after a small chunk does not
    assert starts[chunks[-2][0]] % local.DIRECT_ALIGN == 0 and starts[chunks[-1][0]] % local.DIRECT_ALIGN != 0
    assert all(store.get(d) == data for d, data in chunks)
    pack = tmp_path / "c" / "packs" / "pack-000001.pack"
    end = max(off + 40 + len(data) for (d, data), off in ((c, starts[c[0]]) for c in chunks))
    assert pack.stat().st_size > end  # extended ahead of the direct writes
    store.close()
    assert pack.stat().st_size == end  # and cut back to the last record when closed
    with LocalChunkStore(tmp_path / "c") as again:
        assert again.recovered == 0 and all(again.get(d) == data for d, data in chunks)
        fresh = hash_bytes(b"z" * (1 << 20))
        again.put(fresh, b"z" * (1 << 20), cache=False)  # after a reopen, at the next boundary again
        assert record_starts(again)[fresh] % local.DIRECT_ALIGN == 0 and again.get(fresh) == b"z" * (1 << 20)


def test_a_filesystem_without_direct_io_gets_page_cache_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    real_open = os.open

    def no_direct(path: object, flags: int, *args: object) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")  # as tmpfs answers
        return real_open(path, flags, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", no_direct)
    store = LocalChunkStore(tmp_path / "c")
    chunks = mixed_chunks()
    for d, data in chunks:
        store.put(d, data, cache=False)
    starts = record_starts(store)
    assert sorted(starts.values()) == [sum(40 + s for s in MIXED[:n]) for n in range(len(MIXED))]  # packed tight
    assert all(store.get(d) == data for d, data in chunks)
    store.close()


MIXED_WRITER = """
import os, signal, sys
sys.path.insert(0, sys.argv[2])
from test_store import mixed_chunks
from engine.chunks import LocalChunkStore
store = LocalChunkStore(sys.argv[1])
for n, (d, data) in enumerate(mixed_chunks(0) + mixed_chunks(100)):
    store.put(d, data, cache=False)
    if n == 3:
        store.sync()
print("written", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_unsynced_direct_records_and_their_padding_survive_a_kill(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", MIXED_WRITER, str(tmp_path / "c"), str(Path(__file__).parent)],
                          capture_output=True)
    assert proc.returncode == -signal.SIGKILL and b"written" in proc.stdout, proc.stderr
    chunks = mixed_chunks(0) + mixed_chunks(100)
    pack = tmp_path / "c" / "packs" / "pack-000001.pack"
    extended = pack.stat().st_size
    store = LocalChunkStore(tmp_path / "c")
    assert store.recovered == len(chunks) - 4  # every record after the sync, across the zero padding
    assert pack.stat().st_size < extended  # the zeros the killed writer had allocated ahead are cut
    assert store.missing([d for d, _ in chunks]) == []
    assert all(store.get(d) == data for d, data in chunks)
    store.close()


def test_a_torn_direct_record_is_cut_at_its_boundary(tmp_path: Path) -> None:
    from engine.chunks import local

    store = LocalChunkStore(tmp_path / "c")
    small, big = (hash_bytes(b"s" * 100), b"s" * 100), (hash_bytes(b"b" * (1 << 20)), b"b" * (1 << 20))
    store.put(*small)
    store.sync()
    store.close()
    pack = next((tmp_path / "c" / "packs").glob("*.pack"))
    boundary = local.DIRECT_ALIGN
    with open(pack, "ab") as fh:  # the padding, then a direct record the crash cut short
        fh.write(bytes(boundary - 140))
        fh.write(b"FLC1" + (1 << 20).to_bytes(4, "little") + bytes.fromhex(big[0]) + big[1][:5000])
    reopened = LocalChunkStore(tmp_path / "c")
    assert reopened.recovered == 0 and pack.stat().st_size == boundary  # cut where the torn record began
    assert reopened.get(small[0]) == small[1] and reopened.missing([big[0]]) == [big[0]]
    assert reopened.put(*big, cache=False) and reopened.get(big[0]) == big[1]
    reopened.close()
    with LocalChunkStore(tmp_path / "c") as again:
        assert again.get(big[0]) == big[1]


def test_padding_that_is_not_zeros_ends_the_tail_scan(tmp_path: Path) -> None:
    store = LocalChunkStore(tmp_path / "c")
    store.put(hash_bytes(b"s" * 100), b"s" * 100)
    store.sync()
    store.close()
    pack = next((tmp_path / "c" / "packs").glob("*.pack"))
    big = b"b" * (1 << 20)
    with open(pack, "ab") as fh:  # "padding" with a stray byte in it, then an intact record on the boundary
        fh.write(bytes(100) + b"\x01" + bytes(4096 - 140 - 101))
        fh.write(b"FLC1" + len(big).to_bytes(4, "little") + bytes.fromhex(hash_bytes(big)) + big)
    reopened = LocalChunkStore(tmp_path / "c")
    assert reopened.recovered == 0 and pack.stat().st_size == 140
    reopened.close()


def test_direct_writers_write_side_by_side_without_overlapping(tmp_path: Path) -> None:
    import threading

    store = LocalChunkStore(tmp_path / "c", pack_limit=12 << 20)  # rolls to new packs while they write
    shared = (hash_bytes(b"s" * (1 << 20)), b"s" * (1 << 20))
    per_thread = [[(hash_bytes(d), d) for d in (bytes([t, n]) * (1 << 19) for n in range(6))] for t in range(8)]
    fresh: list[bool] = []

    def writer(chunks: list[tuple[str, bytes]]) -> None:
        fresh.append(store.put(*shared, cache=False))
        for d, data in chunks:
            assert store.put(d, data, cache=False)

    threads = [threading.Thread(target=writer, args=(c,)) for c in per_thread]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(fresh) == [False] * 7 + [True]  # the shared chunk was written once
    with store._lock:
        rows = store._db.execute("SELECT pack, offset, length FROM chunks ORDER BY pack, offset").fetchall()
    for (pack, off, n), (pack2, off2, _) in zip(rows, rows[1:], strict=False):
        assert pack != pack2 or off + n + 40 <= off2, "two records overlap"
    everything = [shared] + [c for chunks in per_thread for c in chunks]
    assert all(store.get(d) == data for d, data in everything)
    store.close()
    with LocalChunkStore(tmp_path / "c") as again:
        assert again.recovered == 0 and all(again.get(d) == data for d, data in everything)


def test_a_sync_waits_for_the_direct_writes_in_flight(tmp_path: Path) -> None:
    import threading

    store = LocalChunkStore(tmp_path / "c")
    entered, release = threading.Event(), threading.Event()
    real = store._write_direct

    def held(*args: object) -> object:
        entered.set()
        assert release.wait(10)
        return real(*args)  # type: ignore[arg-type]

    store._write_direct = held  # type: ignore[method-assign]
    big = (hash_bytes(b"b" * (1 << 20)), b"b" * (1 << 20))
    putter = threading.Thread(target=store.put, args=big, kwargs={"cache": False})
    putter.start()
    assert entered.wait(10)
    syncer = threading.Thread(target=store.sync)
    syncer.start()
    syncer.join(timeout=0.3)
    assert syncer.is_alive(), "the sync committed while a write was in flight"
    release.set()
    putter.join()
    syncer.join()
    store.close()
    with LocalChunkStore(tmp_path / "c") as again:
        assert again.recovered == 0 and again.get(big[0]) == big[1]  # indexed by the sync, not found by the scan


def aligned_copy(data: bytes) -> memoryview:
    """``data`` in a page-aligned writable buffer (as a receiver reads its answers)."""
    import mmap

    buf = mmap.mmap(-1, max(len(data), 1))
    buf[:len(data)] = data
    return memoryview(buf)[:len(data)]


BLOCKED_WRITER = """
import os, signal, sys
sys.path.insert(0, sys.argv[2])
from test_store import aligned_copy, mixed_chunks
from engine.chunks import LocalChunkStore
store = LocalChunkStore(sys.argv[1])
for n, (d, data) in enumerate(mixed_chunks(7)):
    store.put(d, aligned_copy(data), cache=False)
    if n == 1:
        store.sync()
print("written", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_aligned_bytes_get_block_headed_records_written_from_where_they_are(tmp_path: Path) -> None:
    from engine.chunks import local

    store = LocalChunkStore(tmp_path / "c")
    big = b"q" * (1 << 20)
    digest = hash_bytes(big)
    staged: list[int] = []
    real = store._write_direct

    def spy(fds: Any, start: int, end: int, d: str, data: Any, staging: Any, blocked: bool) -> Any:
        staged.append(blocked)
        return real(fds, start, end, d, data, staging, blocked)

    store._write_direct = spy  # type: ignore[method-assign]
    store.put(digest, aligned_copy(big), cache=False)
    store.put(hash_bytes(b"r" * (1 << 20)), b"r" * (1 << 20), cache=False)  # bytes: not checked, staged
    odd = aligned_copy(b"t" * 300_001)  # aligned, but not whole blocks: staged
    store.put(hash_bytes(odd), odd, cache=False)
    assert staged == [True, False, False]
    start = record_starts(store)[digest] + 40 - local.DIRECT_ALIGN  # the bytes follow a whole header block
    assert start % local.DIRECT_ALIGN == 0 and store.get(digest) == big
    store.close()
    pack = next((tmp_path / "c" / "packs").glob("*.pack"))
    with open(pack, "rb") as fh:
        fh.seek(start)
        assert fh.read(4) == b"FLC2"
    with LocalChunkStore(tmp_path / "c") as again:
        assert again.get(digest) == big and again.get(hash_bytes(odd)) == bytes(odd)


def test_unsynced_block_headed_records_survive_a_kill(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", BLOCKED_WRITER, str(tmp_path / "c"), str(Path(__file__).parent)],
                          capture_output=True)
    assert proc.returncode == -signal.SIGKILL and b"written" in proc.stdout, proc.stderr
    chunks = mixed_chunks(7)
    store = LocalChunkStore(tmp_path / "c")
    assert store.recovered == len(chunks) - 2
    assert all(store.get(d) == data for d, data in chunks)
    store.close()


# -- load: a chunk read into the caller's buffer, for the server's served chunks -------------------


def _aligned(size: int) -> memoryview:
    from engine.chunks.base import page_aligned_buffer

    return page_aligned_buffer(size)


def test_load_reads_every_kind_of_record_into_the_callers_buffer(store: ChunkStore) -> None:
    chunks = [*mixed_chunks(7), (hash_bytes(b""), b"")]  # an empty tensor's chunk too
    for n, (d, data) in enumerate(chunks):
        store.put(d, data, cache=n % 2 == 0)  # buffered, direct and block-headed records in turn
    store.sync()
    given: list[memoryview] = []

    def buffer(size: int) -> memoryview:
        given.append(_aligned(size))
        return given[-1]

    for d, data in chunks:
        given.clear()
        loaded = store.load(d, buffer)
        assert bytes(loaded) == data
        if isinstance(store, LocalChunkStore):  # read into the buffer handed over, nowhere else
            assert len(given) == 1 and given[0].obj is memoryview(loaded).obj
    with pytest.raises(ChunkMissing):
        store.load(hash_bytes(b"never stored"), _aligned)


def test_load_reads_what_is_not_in_the_page_cache_around_it(tmp_path: Path) -> None:
    from engine.chunks import local

    store = LocalChunkStore(tmp_path / "c", cache_window=0)
    chunks = [(hash_bytes(d), d) for d in (os.urandom(1 << 20) for _ in range(8))]
    pack = store.packs_dir / store._pack
    fd = os.open(pack, os.O_RDONLY)
    for d, data in chunks:
        store.put(d, data)
    assert all(local._all_cached(fd, store.stat(d).offset, len(data)) for d, data in chunks)  # type: ignore[union-attr]
    store.sync()  # a window of 0: every synced page leaves the cache
    before = _resident_bytes(pack)
    assert before <= 64 << 10, before
    assert not any(local._all_cached(fd, store.stat(d).offset, len(data)) for d, data in chunks)  # type: ignore[union-attr]
    assert all(bytes(store.load(d, _aligned)) == data for d, data in chunks)
    assert _resident_bytes(pack) <= before + (64 << 10)  # O_DIRECT: nothing came into the cache
    os.close(fd)
    store.close()


def test_load_without_direct_io_reads_through_the_page_cache(tmp_path: Path) -> None:
    store = LocalChunkStore(tmp_path / "c", cache_window=0, direct=False)
    chunks = mixed_chunks(3)
    for d, data in chunks:
        store.put(d, data)
    store.sync()
    assert all(bytes(store.load(d, _aligned)) == data for d, data in chunks)
    store.close()


def test_load_of_a_record_cut_short_on_disk_is_refused(tmp_path: Path) -> None:
    store = LocalChunkStore(tmp_path / "c")
    d, data = chunk(9, 300_000)
    store.put(d, data)
    store.sync()
    stat = store.stat(d)
    assert stat is not None and stat.pack is not None
    os.truncate(store.packs_dir / stat.pack, stat.offset + 1000)
    with pytest.raises(ChunkIntegrityError):
        store.load(d, _aligned)
    store.close()
