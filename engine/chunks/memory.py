"""A chunk store in a dict, for tests (same contract as the local store)."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator

from engine.chunks.base import Buffer, ChunkStat, ChunkStore, check_digest
from engine.chunks.base import verify as check
from engine.errors import ChunkMissing

__all__ = ["MemoryChunkStore"]


class MemoryChunkStore(ChunkStore):
    """Chunks in memory; ``sync`` has nothing to do."""

    def __init__(self) -> None:
        self._chunks: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def missing(self, digests: Iterable[str]) -> list[str]:
        out = []
        with self._lock:
            for d in dict.fromkeys(digests):
                if check_digest(d) not in self._chunks:
                    out.append(d)
        return out

    def put(self, digest: str, data: Buffer, *, verified: bool = False, cache: bool = True) -> bool:
        self._check_put(digest, data, verified)
        with self._lock:
            if digest in self._chunks:
                return False
            self._chunks[digest] = bytes(data)
            return True

    def get(self, digest: str, *, verify: bool = True) -> bytes:
        with self._lock:
            data = self._chunks.get(check_digest(digest))
        if data is None:
            raise ChunkMissing(digest, "the memory store")
        if verify:
            check(digest, data)
        return data

    def stat(self, digest: str) -> ChunkStat | None:
        with self._lock:
            data = self._chunks.get(check_digest(digest))
        return None if data is None else ChunkStat(digest, len(data))

    def sync(self) -> None:
        return None

    def digests(self) -> Iterator[str]:
        with self._lock:
            return iter(list(self._chunks))

    def delete(self, digests: Iterable[str]) -> int:
        with self._lock:
            return sum(1 for d in digests if self._chunks.pop(d, None) is not None)

    def corrupt(self, digest: str, data: bytes) -> None:
        """Replace a chunk's bytes without verifying (tests of the integrity checks)."""
        with self._lock:
            self._chunks[digest] = data
