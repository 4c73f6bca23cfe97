"""Content-addressed chunk store: immutable byte strings named by the blake3 of their bytes.

``ChunkStore`` is the interface (``missing``, ``put``, ``get``, ``stat``, ``sync``);
``MemoryChunkStore`` serves tests, ``LocalChunkStore`` (append-only pack files plus an
index) is the default on disk. Every write and every read is verified: bytes that do
not hash to their address raise ``ChunkIntegrityError`` and are never used; a copy
found corrupt on read is dropped from the index so that it is fetched again. The one
exception is serving a download (``load``, or ``get(..., verify=False)``): the receiving side hashes
every chunk before it uses it, so the server does not hash it once per receiver too.
"""

from engine.chunks.base import ChunkStat, ChunkStore, check_digest, hash_bytes
from engine.chunks.local import LocalChunkStore
from engine.chunks.memory import MemoryChunkStore

__all__ = ["ChunkStat", "ChunkStore", "LocalChunkStore", "MemoryChunkStore", "check_digest", "hash_bytes"]
