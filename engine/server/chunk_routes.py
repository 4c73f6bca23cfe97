"""Chunk routes: have/want, upload and download of content-addressed chunks (raw octet bodies).

- ``POST /v1/chunks/missing`` ``{"digests": [...]}`` → ``{"missing": [...]}``: which of these
  the server lacks (what a site must upload before submitting a result that names them);
- ``PUT /v1/chunks/{digest}``: the chunk's bytes; verified against the address before
  anything is stored (422 otherwise), 201 when new, 200 when already held;
- ``POST /v1/chunks/fetch`` ``{"digests": [...]}``: several chunks in one answer (at most
  ``MAX_BATCH``), their bytes one after another and their lengths in the
  ``Fedlog-Chunk-Lengths`` header; the answer stops early (at least one chunk) rather
  than pass ``MAX_BATCH_BYTES``, and the caller asks again for the rest;
- ``POST /v1/chunks/upload``: several chunks in one body, named in order with their
  lengths by the ``Fedlog-Chunks`` header (``<digest>:<length>,...``); every one is
  verified before any is stored (422 naming the first bad one, nothing stored);
- ``GET /v1/chunks/{digest}``: the bytes. A site may read only the manifests handed to
  it with its assignments and the chunks those manifests name (403 for any other
  address, whether or not the server holds it); the admin may read any. A site that
  uploads a manifest (its bytes checked against the address, even when the server
  already holds it) may read it and share it: a manifest named in an aux request
  between sites of a job (a swarm submission, a learn task) is granted to the
  targets, so a payload uploaded once is fetched by its receivers, never uploaded again.

The batched routes exist because a request costs a fixed amount of Python on both
sides (``engine/chunks/wire.py``).

Uploaded chunks become durable at the acknowledgement boundary: the submission of
the result that names them syncs the store before the result is recorded.
"""

from __future__ import annotations

import asyncio
import threading
from typing import TYPE_CHECKING, Any

from engine.chunks.base import MAX_CHUNK_BYTES, ChunkStore, check_digest
from engine.chunks.base import verify as verify_bytes
from engine.chunks.wire import CHUNKS_HEADER, LENGTHS_HEADER, MAX_BATCH, MAX_BATCH_BYTES
from engine.errors import ChunkError, ChunkIntegrityError, ChunkMissing, ManifestError
from engine.provision import ROLE_ADMIN
from engine.server.auth import ANY_ROLE
from engine.server.http import (
    HttpError,
    Request,
    Response,
    bytes_response,
    empty_response,
    json_response,
    parts_response,
)
from engine.server.routing import Route, Router
from engine.tensors import Manifest, refs_in

if TYPE_CHECKING:
    from engine.server.service import FedServer

__all__ = ["ChunkAccess", "chunk_router", "require_payloads"]

MAX_DIGESTS = 200_000


class ChunkAccess:
    """Which addresses each site may read: the manifests delivered to it and their chunks."""

    def __init__(self, store: ChunkStore) -> None:
        self.store = store
        self._allowed: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    def grant(self, site: str, value: Any) -> None:
        """Let ``site`` read every payload referenced in ``value`` (task data handed to it)."""
        for digest in refs_in(value):
            try:
                manifest = Manifest.from_bytes(self.store.get(digest))
            except (ChunkError, ManifestError):
                continue  # nothing to read then; the site will get a 404 and say so
            with self._lock:
                allowed = self._allowed.setdefault(site, set())
                allowed.add(digest)
                allowed.update(manifest.chunk_digests())

    def note_upload(self, site: str, digest: str) -> None:
        """``site`` uploaded the bytes of ``digest`` (it holds them, so it may read and share them)."""
        with self._lock:
            self._allowed.setdefault(site, set()).add(digest)

    def share(self, sender: str, targets: list[str], value: Any) -> list[str]:
        """Grant ``targets`` the payloads referenced in ``value`` that ``sender`` may read; return those."""
        shared = []
        for digest in refs_in(value):
            if not self.allows(sender, digest):
                continue  # naming an address is not holding it: the target gets a 403 and says so
            for target in targets:
                self.grant(target, {"$tensors": digest})
            shared.append(digest)
        return shared

    def allows(self, site: str, digest: str) -> bool:
        with self._lock:
            return digest in self._allowed.get(site, ())


def require_payloads(store: ChunkStore, value: Any) -> None:
    """Check that every payload ``value`` references is complete in ``store``; then make it durable.

    Raises HttpError 422 naming the first manifest that is missing, malformed or incomplete.
    """
    for digest in refs_in(value):
        try:
            manifest = Manifest.from_bytes(store.get(digest))
        except ChunkMissing:
            raise HttpError(422, "missing_manifest", f"manifest {digest} was not uploaded",
                            details={"digest": digest}) from None
        except (ChunkIntegrityError, ManifestError) as exc:
            raise HttpError(422, "invalid_manifest", str(exc), details={"digest": digest}) from None
        missing = store.missing(manifest.chunk_digests())
        if missing:
            raise HttpError(422, "missing_chunks", f"{len(missing)} chunk(s) of manifest {digest} were not uploaded "
                                                   f"(first: {missing[0]})", details={"missing": missing[:100]})
    store.sync()


def _server(request: Request) -> FedServer:
    server: FedServer = request.app.state
    return server


def _digest(request: Request) -> str:
    try:
        return check_digest(request.path_params["digest"])
    except ChunkError as exc:
        raise HttpError(422, "invalid_digest", str(exc)) from None


async def _listed_digests(request: Request) -> list[str]:
    """The ``digests`` of a JSON body, each well-formed (422 naming the first that is not)."""
    body = await request.json()
    try:
        return [check_digest(d) for d in body["digests"]]
    except ChunkError as exc:
        raise HttpError(422, "invalid_digest", str(exc)) from None


def _check_granted(request: Request, digest: str) -> None:
    """403 unless the caller was given a manifest naming ``digest`` (the admin reads any)."""
    who = request.identity
    assert who is not None
    if who.role != ROLE_ADMIN and not _server(request).chunk_access.allows(who.name, digest):
        raise HttpError(403, "chunk_not_granted", f"{who.name} was never given a manifest naming chunk {digest}",
                        details={"digest": digest})


def _held(request: Request, digest: str) -> bytes | bytearray | memoryview:
    """A chunk's bytes as the server holds them (404 if it does not); the caller checked the grant.

    Task data pinned for a round comes from the tensor streamer, anything else from the
    chunks held for downloads (read from the store once for all sites asking). Blocking
    (a disk read, and a hash for task data the first time): called on a worker thread,
    so the event loop only copies bytes already in memory. Not hashed otherwise: the site
    verifies every chunk before using it, so hashing it here (once per site) would repeat that.
    """
    server = _server(request)
    try:
        return server.tensor_streamer.chunk(digest) or server.served.get(digest)
    except ChunkMissing:
        raise HttpError(404, "unknown_chunk", f"the server does not hold chunk {digest}",
                        details={"digest": digest}) from None


async def missing(request: Request) -> Response:
    """Which of the given addresses the server lacks."""
    wanted = await _listed_digests(request)
    return json_response({"missing": _server(request).chunks.missing(wanted)})


async def put_chunk(request: Request) -> Response:
    """Store one chunk after checking its bytes against its address."""
    digest = _digest(request)
    server = _server(request)
    store = server.chunks
    who = request.identity
    assert who is not None
    data = await request.body(MAX_CHUNK_BYTES)

    def keep() -> bool:
        held = store.stat(digest) is not None
        if held:
            verify_bytes(digest, data)  # a repeat proves possession only if the bytes match
        else:
            store.put(digest, data)
        return held

    try:
        # hashing and writing a MiB off the event loop: it goes on reading the other sites' uploads
        held = await asyncio.to_thread(keep)
    except ChunkIntegrityError as exc:
        raise HttpError(422, "chunk_integrity", str(exc), details={"digest": digest}) from None
    server.chunk_access.note_upload(who.name, digest)
    return empty_response(200 if held else 201)


async def get_chunk(request: Request) -> Response:
    """A chunk's bytes, to a site that was given a manifest naming it."""
    digest = _digest(request)
    _check_granted(request, digest)
    return bytes_response(await asyncio.to_thread(_held, request, digest))


async def fetch_chunks(request: Request) -> Response:
    """Several granted chunks in one answer, in the order asked (it may stop early; see the module)."""
    digests = await _listed_digests(request)
    for digest in digests:  # every chunk is granted, or nothing is sent
        _check_granted(request, digest)
    parts = await asyncio.to_thread(_held_batch, request, digests)
    return parts_response(parts, headers={LENGTHS_HEADER: ",".join(str(len(p)) for p in parts)})


def _held_batch(request: Request, digests: list[str]) -> list[bytes | bytearray | memoryview]:
    """The chunks of one fetch answer (``_held``), stopping before ``MAX_BATCH_BYTES``."""
    parts: list[bytes | bytearray | memoryview] = []
    size = 0
    for digest in digests:
        data = _held(request, digest)
        if parts and size + len(data) > MAX_BATCH_BYTES:
            break  # the caller asks again for the rest
        parts.append(data)
        size += len(data)
    return parts


def _upload_plan(request: Request) -> list[tuple[str, int]]:
    raw = request.headers.get(CHUNKS_HEADER.lower(), "")
    plan: list[tuple[str, int]] = []
    for item in raw.split(",") if raw else ():
        digest, _, size_text = item.strip().partition(":")
        try:
            plan.append((check_digest(digest), int(size_text)))
        except ChunkError as exc:
            raise HttpError(422, "invalid_digest", str(exc)) from None
        except ValueError:
            raise HttpError(422, "invalid_chunk_list", f"{CHUNKS_HEADER}: {item[:100]!r} is not <digest>:<length>"
                            ) from None
    if not plan:
        raise HttpError(422, "invalid_chunk_list", f"the {CHUNKS_HEADER} header names no chunk")
    if len(plan) > MAX_BATCH:
        raise HttpError(422, "invalid_chunk_list", f"{len(plan)} chunks in one upload; the limit is {MAX_BATCH}")
    for digest, length in plan:
        if not 0 <= length <= MAX_CHUNK_BYTES:
            raise HttpError(422, "invalid_chunk_list", f"chunk {digest} is said to be {length} bytes; a chunk "
                                                       f"holds 0 to {MAX_CHUNK_BYTES}", details={"digest": digest})
    total = sum(length for _, length in plan)
    if total > MAX_BATCH_BYTES:
        raise HttpError(413, "payload_too_large", f"an upload of {total} bytes; the limit is {MAX_BATCH_BYTES}",
                        details={"limit": MAX_BATCH_BYTES})
    if request.content_length != total:
        raise HttpError(422, "invalid_chunk_list", f"the {CHUNKS_HEADER} header adds up to {total} bytes but the "
                                                   f"body is {request.content_length}")
    return plan


async def upload_chunks(request: Request) -> Response:
    """Store several chunks after checking every one against its address (all or none)."""
    plan = _upload_plan(request)
    server = _server(request)
    store = server.chunks
    who = request.identity
    assert who is not None
    # the body as it arrived; joined on the worker thread, not on the event loop (8 MiB is
    # milliseconds of copying, page faults included, that other sites' requests would wait on)
    received = [piece async for piece in request.stream(MAX_BATCH_BYTES)]

    def keep() -> int:
        data = memoryview(received[0] if len(received) == 1 else b"".join(received))
        pieces = []
        offset = 0
        for digest, length in plan:
            piece = data[offset:offset + length]
            offset += length
            verify_bytes(digest, piece)  # all verified before any is stored: a bad batch changes nothing
            pieces.append((digest, piece))
        return sum(store.put(digest, piece, verified=True) for digest, piece in pieces)

    try:
        added = await asyncio.to_thread(keep)
    except ChunkIntegrityError as exc:
        raise HttpError(422, "chunk_integrity", str(exc), details={"digest": exc.digest}) from None
    for digest, _ in plan:
        server.chunk_access.note_upload(who.name, digest)
    return json_response({"stored": added, "held": len(plan) - added}, status=201 if added else 200)


def chunk_router() -> Router:
    """The chunk routes."""
    return Router([
        Route("POST", "/v1/chunks/missing", missing, "Which of these chunk addresses the server lacks",
              roles=ANY_ROLE, body="json",
              request_schema={"type": "object", "required": ["digests"], "additionalProperties": False,
                              "properties": {"digests": {"type": "array", "maxItems": MAX_DIGESTS,
                                                         "items": {"type": "string"}}}},
              response_schema={"type": "object", "required": ["missing"]}, tags=("chunks",), errors=(422,)),
        Route("PUT", "/v1/chunks/{digest}", put_chunk, "Upload one chunk (raw bytes, verified)", roles=ANY_ROLE,
              body="octet", response_type=None, status=201, tags=("chunks",), errors=(413, 422)),
        Route("POST", "/v1/chunks/fetch", fetch_chunks, "Download several granted chunks in one answer",
              roles=ANY_ROLE, body="json",
              request_schema={"type": "object", "required": ["digests"], "additionalProperties": False,
                              "properties": {"digests": {"type": "array", "minItems": 1, "maxItems": MAX_BATCH,
                                                         "items": {"type": "string"}}}},
              response_type="application/octet-stream", tags=("chunks",), errors=(403, 404, 422)),
        Route("POST", "/v1/chunks/upload", upload_chunks, "Upload several chunks in one body (all verified)",
              roles=ANY_ROLE, body="octet", status=201,
              response_schema={"type": "object", "required": ["stored", "held"]}, tags=("chunks",),
              errors=(413, 422)),
        Route("GET", "/v1/chunks/{digest}", get_chunk, "Download one chunk granted to the caller", roles=ANY_ROLE,
              response_type="application/octet-stream", tags=("chunks",), errors=(403, 404, 422)),
    ])
