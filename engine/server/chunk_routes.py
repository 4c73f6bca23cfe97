"""Chunk routes: have/want, upload and download of content-addressed chunks (raw octet bodies).

- ``POST /v1/chunks/missing`` ``{"digests": [...]}`` → ``{"missing": [...]}``: which of these
  the server lacks (what a site must upload before submitting a result that names them);
- ``PUT /v1/chunks/{digest}``: the chunk's bytes; verified against the address before
  anything is stored (422 otherwise), 201 when new, 200 when already held;
- ``GET /v1/chunks/{digest}``: the bytes. A site may read only the manifests handed to
  it with its assignments and the chunks those manifests name (403 for any other
  address, whether or not the server holds it); the admin may read any. A site that
  uploads a manifest (its bytes checked against the address, even when the server
  already holds it) may read it and share it: a manifest named in an aux request
  between sites of a job (a swarm submission, a learn task) is granted to the
  targets, so a payload uploaded once is fetched by its receivers, never uploaded again.

Uploaded chunks become durable at the acknowledgement boundary: the submission of
the result that names them syncs the store before the result is recorded.
"""

from __future__ import annotations

import asyncio
import threading
from typing import TYPE_CHECKING, Any

from engine.chunks.base import MAX_CHUNK_BYTES, ChunkStore, check_digest
from engine.chunks.base import verify as verify_bytes
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


async def missing(request: Request) -> Response:
    """Which of the given addresses the server lacks."""
    body = await request.json()
    try:
        wanted = [check_digest(d) for d in body["digests"]]
    except ChunkError as exc:
        raise HttpError(422, "invalid_digest", str(exc)) from None
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
    server = _server(request)
    who = request.identity
    assert who is not None
    if who.role != ROLE_ADMIN and not server.chunk_access.allows(who.name, digest):
        raise HttpError(403, "chunk_not_granted", f"{who.name} was never given a manifest naming chunk {digest}")
    try:
        # the site verifies every chunk against its address before using it: hashing it here
        # as well (once per site) would only repeat that, on the server's CPU
        data = server.tensor_streamer.chunk(digest) or server.chunks.get(digest, verify=False)
    except ChunkMissing:
        raise HttpError(404, "unknown_chunk", f"the server does not hold chunk {digest}") from None
    return bytes_response(data)


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
        Route("GET", "/v1/chunks/{digest}", get_chunk, "Download one chunk granted to the caller", roles=ANY_ROLE,
              response_type="application/octet-stream", tags=("chunks",), errors=(403, 404, 422)),
    ])
