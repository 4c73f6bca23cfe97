"""Tensor payloads on a site: fetch what task data references, store and upload what results hold.

The site keeps its own chunk store (beside its local log). Task data arrives as JSON
with references (``{"$tensors": "<manifest address>"}``): ``fetch`` downloads the
manifest and only the chunks the site lacks (an unchanged model costs the manifest),
verifies each, and rebuilds the tensors. A result holding tensors is stored locally
*before* it is recorded as computed (``externalize``), so a site that dies after
computing re-submits it without recomputing; ``upload`` sends the server exactly the
chunks it lacks (have/want) before the result that names them is submitted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from engine.chunks import ChunkStore
from engine.chunks.base import Buffer
from engine.client.api import SiteApi
from engine.errors import ChunkIntegrityError, EngineError
from engine.machines.runtime import Runtime
from engine.streams import ReceiveSession, SendSession, StreamReport
from engine.tensors import Filling, Manifest, has_tensors, pack, ref, refs_in, replace_refs, unpack
from engine.tensors import store as store_packed

__all__ = ["SitePayloads"]

logger = logging.getLogger(__name__)


class SitePayloads:
    """Moves a site's tensor payloads between the server and the site's chunk store."""

    def __init__(self, api: SiteApi, store: ChunkStore, runtime: Runtime | None = None, *,
                 in_flight: int = 4) -> None:
        self.api = api
        self.store = store
        #: the site's runtime: transfers are recorded as stream sessions in its log (None: not recorded)
        self.runtime = runtime
        self.in_flight = in_flight
        self.reports: list[StreamReport] = []
        #: bytes downloaded and uploaded (progress and tests)
        self.bytes_in = 0
        self.bytes_out = 0

    def _download(self, digest: str) -> None:
        for attempt in (1, 2):
            data = self.api.get_chunk(digest)
            self.bytes_in += len(data)
            try:
                self.store.put(digest, data)
                return
            except ChunkIntegrityError:
                if attempt == 2:
                    raise  # the bad copy is never used

    def _reporter(self, session: str) -> Any:
        def report(event: str, data: dict[str, Any]) -> None:
            try:
                self.api.report_stream(session, event, data)
            except EngineError as exc:  # the transfer goes on; the server's record of it lags
                logger.info("%s: %s of %s not reported: %s", self.api.site, event, session, exc)
        return report

    def fetch(self, value: Any, session: str | None = None, streaming: dict[str, Any] | None = None) -> Any:
        """``value`` with every reference replaced by its payload (downloading only missing chunks).

        With a runtime and a ``session`` name (the assignment id), each payload's transfer
        is a ``stream_receive`` machine ``recv:<session>:<manifest>``, resumed if it was cut short.
        ``streaming`` is what the server said of the task data (its TensorServerStreamer role):
        the server-side sessions to report progress on and the ``tensor_send_timeout``.
        """
        if not refs_in(value):
            return value

        def fetch_counted(digest: str) -> bytes:
            data = self.api.get_chunk(digest)
            self.bytes_in += len(data)
            return data

        def fetch_many_counted(digests: list[str], into: Callable[[int], memoryview] | None = None) -> list[memoryview]:
            datas = self.api.get_chunks(digests, into)
            self.bytes_in += sum(len(d) for d in datas)
            return datas

        def load(digest: str) -> Any:
            if self.runtime is not None and session is not None:
                server_side = f"tss:{session}:{digest[:16]}"
                reported = streaming is not None and server_side in (streaming.get("sessions") or ())
                entry = float((streaming or {}).get("tensor_send_timeout") or 60.0)
                # the tensors are filled from the answers as they arrive, so the stored copies are
                # only for keeping: written around the page cache (see LocalChunkStore)
                receiver = ReceiveSession(self.runtime, self.store, fetch_counted, f"recv:{session}:{digest[:16]}",
                                          fetch_many=fetch_many_counted, in_flight=self.in_flight,
                                          entry_timeout=entry, cache=False,
                                          reporter=self._reporter(server_side) if reported else None)
                filling: list[Filling] = []

                def on_manifest(manifest: Manifest) -> Callable[[str, Buffer], None]:
                    filling.append(Filling(manifest))
                    return filling[0].fill

                _, report = receiver.run(digest, on_manifest=on_manifest)
                self.reports.append(report)
                return filling[0].finish(self.store.read_into)
            if self.store.missing([digest]):
                self._download(digest)
            manifest = Manifest.from_bytes(self.store.get(digest))
            for missing in self.store.missing(manifest.chunk_digests()):
                self._download(missing)
            self.store.sync()
            return unpack(manifest, read_into=self.store.read_into)

        return replace_refs(value, load)

    def externalize(self, value: Any) -> Any:
        """JSON for ``value``: each top-level entry holding tensors is stored locally and referenced."""
        if isinstance(value, dict):
            return {k: self.externalize_one(v) for k, v in value.items()}
        return self.externalize_one(value)

    def externalize_one(self, value: Any) -> Any:
        if not has_tensors(value):
            return value
        return ref(store_packed(pack(value), self.store))

    def upload(self, value: Any, session: str | None = None) -> int:
        """Upload the manifests ``value`` references and the chunks the server lacks; return bytes sent.

        With a runtime and a ``session`` name, each upload is a ``stream_send`` machine
        ``send:<session>:<manifest>``, resumed if it was cut short.
        """
        sent = 0
        for digest in refs_in(value):
            if self.runtime is not None and session is not None:
                sender = SendSession(self.runtime, self.store, self.api.missing_chunks, self.api.put_chunk,
                                     f"send:{session}:{digest[:16]}", put_many=self.api.put_chunks,
                                     in_flight=self.in_flight)
                report = sender.run(digest)
                self.reports.append(report)
                sent += report.bytes_moved
                continue
            manifest = Manifest.from_bytes(self.store.get(digest))
            for missing in self.api.missing_chunks([*manifest.chunk_digests(), digest]):
                data = self.store.get(missing, verify=False)  # the server verifies it (see SendSession)
                self.api.put_chunk(missing, data)
                sent += len(data)
        self.bytes_out += sent
        return sent
