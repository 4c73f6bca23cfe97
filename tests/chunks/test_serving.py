"""The server's served chunks: read once for every site asking, bounded, buffers used again only when free."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from engine.chunks import LocalChunkStore, MemoryChunkStore, hash_bytes
from engine.chunks import serving as serving_module
from engine.chunks.base import Buffer
from engine.chunks.serving import ServedChunks
from engine.errors import ChunkMissing, ConfigError

MIB = 1 << 20


def stored(store: LocalChunkStore | MemoryChunkStore, count: int, size: int = MIB) -> list[tuple[str, bytes]]:
    chunks = [(hash_bytes(d), d) for d in (os.urandom(size) for _ in range(count))]
    for d, data in chunks:
        store.put(d, data)
    store.sync()
    return chunks


def test_sites_asking_for_the_same_chunks_get_them_from_one_read(tmp_path: Path) -> None:
    with LocalChunkStore(tmp_path / "c", cache_window=0) as store:
        chunks = stored(store, 24)
        served = ServedChunks(store, capacity=64 * MIB)
        answers: list[list[bytes]] = [[] for _ in range(4)]

        def site(n: int) -> None:
            answers[n] = [bytes(served.get(d)) for d, _ in chunks]

        threads = [threading.Thread(target=site, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(a == [data for _, data in chunks] for a in answers)
        assert served.loads == len(chunks)  # not once per site


def test_a_chunk_being_read_is_waited_for_not_read_again(monkeypatch: pytest.MonkeyPatch) -> None:
    store = MemoryChunkStore()
    (d, data), = stored(store, 1, 1000)
    gate, inside = threading.Event(), threading.Event()
    reads = []
    real_load = store.load

    def slow_load(digest: str, buffer: Callable[[int], memoryview]) -> Buffer:
        reads.append(digest)
        inside.set()
        assert gate.wait(10)
        return real_load(digest, buffer)

    monkeypatch.setattr(store, "load", slow_load)
    waiting = threading.Semaphore(0)

    class Counted(threading.Event):
        def wait(self, timeout: float | None = None) -> bool:
            waiting.release()
            return super().wait(timeout)

    monkeypatch.setattr(serving_module.threading, "Event", Counted)
    served = ServedChunks(store)
    got: list[bytes] = []
    threads = [threading.Thread(target=lambda: got.append(bytes(served.get(d)))) for _ in range(3)]
    threads[0].start()
    assert inside.wait(10)
    for t in threads[1:]:
        t.start()
    for _ in threads[1:]:
        assert waiting.acquire(timeout=10)  # both wait for the read in progress
    gate.set()
    for t in threads:
        t.join()
    assert got == [data] * 3 and reads == [d]


def test_held_chunks_stay_within_the_capacity_oldest_out_first(tmp_path: Path) -> None:
    with LocalChunkStore(tmp_path / "c") as store:
        chunks = stored(store, 10)
        served = ServedChunks(store, capacity=4 * MIB)
        for d, _ in chunks:
            served.get(d)
            assert served.held_bytes <= 4 * MIB
        served.get(chunks[-1][0])
        assert served.loads == 10  # the newest is still held
        served.get(chunks[0][0])
        assert served.loads == 11  # the oldest went first and is read again


def test_a_buffer_is_used_again_only_once_no_view_of_it_is_left(tmp_path: Path) -> None:
    with LocalChunkStore(tmp_path / "c") as store:
        chunks = stored(store, 40)
        served = ServedChunks(store, capacity=4 * MIB)
        first = served.get(chunks[0][0])  # an answer still sending this one
        for d, _ in chunks[1:20]:
            served.get(d)  # pushes it out, and many buffers are reused meanwhile
        assert bytes(first) == chunks[0][1]  # its buffer was not taken while the view lives
        allocated = served.allocated
        assert allocated < 19  # the others' buffers were used again
        del first
        for d, _ in chunks[20:]:
            assert bytes(served.get(d)) == dict(chunks)[d]
        assert served.allocated == allocated  # steady: every read takes a buffer given back
        assert served.buffer_bytes <= 4 * MIB + 4 * MIB // 8 + 2 * MIB


def test_a_chunk_the_store_lacks_is_missing_and_can_be_served_once_stored() -> None:
    store = MemoryChunkStore()
    served = ServedChunks(store)
    data = b"late" * 100
    with pytest.raises(ChunkMissing):
        served.get(hash_bytes(data))
    store.put(hash_bytes(data), data)
    assert bytes(served.get(hash_bytes(data))) == data
    assert served.held_bytes == len(data)


def test_downloads_stopping_lets_every_chunk_and_buffer_go(tmp_path: Path) -> None:
    with LocalChunkStore(tmp_path / "c") as store:
        chunks = stored(store, 12)
        served = ServedChunks(store, capacity=4 * MIB, idle_s=0.2)
        released = threading.Condition()
        real_release = served.release

        def release() -> None:
            real_release()
            with released:
                released.notify_all()

        served.release = release  # type: ignore[method-assign]
        sending = served.get(chunks[0][0])  # an answer still under way when the release comes
        for d, _ in chunks[1:]:
            served.get(d)
        assert served.loads == 12
        with released:  # by the idle timer, 0.2 s after the last get
            assert released.wait_for(lambda: served.held_bytes == 0, timeout=10)
        assert MIB < served.buffer_bytes < 2 * MIB  # only the answer's buffer is left
        assert bytes(sending) == chunks[0][1]
        del sending
        assert served.buffer_bytes == 0  # and it goes when the answer does
        assert bytes(served.get(chunks[1][0])) == chunks[1][1]  # served again, read from the store
        assert served.loads == 13


def test_release_lets_held_chunks_and_spare_buffers_go_at_once(tmp_path: Path) -> None:
    with LocalChunkStore(tmp_path / "c") as store:
        chunks = stored(store, 8)
        served = ServedChunks(store, capacity=4 * MIB, idle_s=3600)
        for d, _ in chunks:
            served.get(d)
        assert served.held_bytes == 4 * MIB and served.buffer_bytes > 4 * MIB  # spares from evictions too
        served.release()
        assert served.held_bytes == 0 and served.buffer_bytes == 0


@pytest.mark.parametrize(("capacity", "idle_s", "says"), [
    (-1, 10.0, "capacity is a number of bytes >= 0, got -1"),
    (1.5, 10.0, "capacity is a number of bytes >= 0, got 1.5"),
    (MIB, 0, "idle time is a number of seconds > 0, got 0"),
    (MIB, float("nan"), "idle time is a number of seconds > 0, got nan"),
])
def test_bad_settings_are_refused(capacity: Any, idle_s: Any, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        ServedChunks(MemoryChunkStore(), capacity, idle_s)
