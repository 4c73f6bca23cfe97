"""The chunk store interface and the address function (blake3, 64 hex digits)."""

from __future__ import annotations

import ctypes
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from blake3 import blake3

from engine.errors import ChunkError, ChunkIntegrityError

__all__ = ["DIGEST_LEN", "MAX_CHUNK_BYTES", "PAGE", "ChunkStat", "ChunkStore", "check_digest", "copy_into",
           "hash_bytes", "page_aligned", "page_aligned_buffer", "page_skip"]

#: hex digits of an address (blake3's 32-byte digest)
DIGEST_LEN = 64
#: the largest chunk a store accepts (tensor chunks are 1 MiB by default)
MAX_CHUNK_BYTES = 64 << 20
#: bytes that start on a multiple of this in memory and are whole multiples of it long can be
#: written around the page cache from where they are (O_DIRECT: every Linux block device's
#: alignment divides a page)
PAGE = 4096
_HEX = re.compile(r"^[0-9a-f]{64}$")

Buffer = bytes | bytearray | memoryview


def hash_bytes(data: Buffer) -> str:
    """The address of ``data``: blake3, lower-case hex."""
    return blake3(data).hexdigest()


def check_digest(digest: object) -> str:
    """``digest`` if it is a well-formed address (64 lower-case hex digits), else ChunkError saying why."""
    if not isinstance(digest, str) or not _HEX.match(digest):
        shown = digest if not isinstance(digest, str) else digest[:80]
        raise ChunkError(f"a chunk address is 64 lower-case hex digits (blake3), got {shown!r}")
    return digest


def verify(digest: str, data: Buffer) -> None:
    """Raise ChunkIntegrityError unless ``data`` hashes to ``digest``."""
    actual = hash_bytes(data)
    if actual != digest:
        raise ChunkIntegrityError(digest, f"its {len(data)} bytes hash to {actual}")


def page_aligned(data: Buffer) -> bool:
    """True if ``data`` starts on a page boundary in memory and is whole pages long.

    Only writable buffers are checked (ctypes maps no read-only ones): ``bytes`` are not.
    """
    if len(data) % PAGE:
        return False
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(data)) % PAGE == 0
    except (TypeError, ValueError):
        return False


def page_skip(raw: bytearray) -> int:
    """How many bytes into ``raw`` the first page boundary lies (``raw`` one page longer than needed)."""
    return -ctypes.addressof(ctypes.c_char.from_buffer(raw)) % PAGE


def page_aligned_buffer(size: int) -> memoryview:
    """``size`` writable bytes starting on a page boundary: heap memory, a page skipped into to align it."""
    raw = bytearray(size + PAGE)
    skip = page_skip(raw)
    return memoryview(raw)[skip:skip + size]


def copy_into(target: Buffer, data: Buffer) -> int:
    """Copy ``data`` into the writable ``target`` when their lengths agree; return ``len(data)``."""
    if len(data) == len(target):
        memoryview(target).cast("B")[:] = data
    return len(data)


@dataclass(frozen=True, slots=True)
class ChunkStat:
    """Where a stored chunk is and how big it is."""

    digest: str
    length: int
    #: the pack file holding it (None in memory)
    pack: str | None = None
    offset: int = 0


class ChunkStore(ABC):
    """Immutable chunks by address. Implementations are safe to use from several threads."""

    @abstractmethod
    def missing(self, digests: Iterable[str]) -> list[str]:
        """The addresses among ``digests`` this store does not hold (in the order given, once each)."""

    @abstractmethod
    def put(self, digest: str, data: Buffer, *, verified: bool = False, cache: bool = True) -> bool:
        """Store ``data`` under ``digest`` after verifying it; False if it was already held.

        ``verified=True``: the caller has just hashed these very bytes (a batch checked whole
        before any of it is stored), so they are not hashed twice. ``cache=False``: a hint
        that the caller keeps the bytes only to have them (it used them from memory already),
        so a store on disk may write them around the page cache.
        Durable only after the next ``sync()`` (acknowledge after syncing).
        """

    @abstractmethod
    def get(self, digest: str, *, verify: bool = True) -> bytes:
        """The chunk's bytes, verified; ChunkMissing if absent, ChunkIntegrityError if corrupt.

        ``verify=False`` skips re-hashing (the length is still checked): only for handing
        the bytes to a peer that verifies them by their address before using them (the
        chunk routes serving a download), where hashing here too would only repeat it.
        """

    def read_into(self, digest: str, target: Buffer) -> int:
        """Read the chunk, verified, into ``target`` (writable, e.g. a slice of a tensor's memory).

        Returns the chunk's length. When it differs from ``len(target)`` nothing is read (the
        caller names the mismatch). ChunkMissing if absent; ChunkIntegrityError if the stored
        copy is corrupt, and then ``target`` holds unspecified bytes that must not be used.
        A store on disk reads straight into ``target``: rebuilding a 34 MiB model took 72 ms
        through ``get`` (a fresh buffer per chunk, its page faults, a second copy) and 20 ms so.
        """
        return copy_into(target, self.get(digest))

    def load(self, digest: str, buffer: Callable[[int], memoryview]) -> Buffer:
        """The chunk's bytes, unverified, for a holder that keeps them in memory of its own.

        A store on disk reads them into ``buffer(n)`` (``n`` writable, page-aligned bytes the
        caller provides and reuses), around the page cache when they are not in it, and
        returns the part of it holding them; others may return the bytes they hold. For
        serving downloads (``engine/chunks/serving.py``), so the site verifies them.
        """
        return self.get(digest, verify=False)

    @abstractmethod
    def stat(self, digest: str) -> ChunkStat | None:
        """Size and location of a held chunk, or None."""

    @abstractmethod
    def sync(self) -> None:
        """Make every chunk put so far durable (fsync): the acknowledgement boundary."""

    @abstractmethod
    def digests(self) -> Iterator[str]:
        """Every held address."""

    @abstractmethod
    def delete(self, digests: Iterable[str]) -> int:
        """Forget chunks (garbage collection); return how many were held."""

    def close(self) -> None:  # noqa: B027 - optional for stores without resources
        """Release files (a memory store has none)."""

    def __enter__(self) -> ChunkStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_put(self, digest: str, data: Buffer, verified: bool = False) -> None:
        check_digest(digest)
        if len(data) > MAX_CHUNK_BYTES:
            raise ChunkError(f"chunk {digest} has {len(data)} bytes; the limit is {MAX_CHUNK_BYTES}")
        if not verified:
            verify(digest, data)
