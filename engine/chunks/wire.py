"""The batched chunk routes' wire format, shared by the server's routes and the sites' client.

A request costs a fixed amount of Python on both sides (headers, dispatch, a response
object), so sites move chunks several to a request:

- ``POST /v1/chunks/fetch`` answers with the chunks' bytes one after another and their
  lengths, comma-separated, in ``LENGTHS_HEADER``;
- ``POST /v1/chunks/upload`` takes them one after another, named in order by
  ``CHUNKS_HEADER`` (``<digest>:<length>,...``).

It lives here, not with the routes, so that a site importing it imports no server code.
"""

from __future__ import annotations

from engine.chunks.base import MAX_CHUNK_BYTES

__all__ = ["CHUNKS_HEADER", "LENGTHS_HEADER", "MAX_BATCH", "MAX_BATCH_BYTES", "batches"]

#: most chunks one batched request may name
MAX_BATCH = 64
#: most bytes one batched answer carries (it stops early, at least one chunk) or one upload holds
MAX_BATCH_BYTES = MAX_CHUNK_BYTES
#: response header of ``POST /v1/chunks/fetch``: the served chunks' lengths
LENGTHS_HEADER = "Fedlog-Chunk-Lengths"
#: request header of ``POST /v1/chunks/upload``: ``<digest>:<length>`` for each chunk in the body
CHUNKS_HEADER = "Fedlog-Chunks"


def batches(sizes: list[int], most: int = MAX_BATCH, limit: int = MAX_BATCH_BYTES) -> list[tuple[int, int]]:
    """``(start, end)`` index ranges over ``sizes``: at most ``most`` items and ``limit`` bytes each
    (an item larger than ``limit`` goes alone)."""
    out = []
    start = 0
    while start < len(sizes):
        end = start + 1
        total = sizes[start]
        while end < len(sizes) and end - start < most and total + sizes[end] <= limit:
            total += sizes[end]
            end += 1
        out.append((start, end))
        start = end
    return out
