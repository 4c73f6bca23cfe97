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

from typing import Any

from engine.chunks import ChunkStore
from engine.client.api import SiteApi
from engine.errors import ChunkIntegrityError
from engine.tensors import Manifest, has_tensors, pack, ref, refs_in, replace_refs, unpack
from engine.tensors import store as store_packed

__all__ = ["SitePayloads"]


class SitePayloads:
    """Moves a site's tensor payloads between the server and the site's chunk store."""

    def __init__(self, api: SiteApi, store: ChunkStore) -> None:
        self.api = api
        self.store = store
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

    def fetch(self, value: Any) -> Any:
        """``value`` with every reference replaced by its payload (downloading only missing chunks)."""
        if not refs_in(value):
            return value

        def load(digest: str) -> Any:
            if self.store.missing([digest]):
                self._download(digest)
            manifest = Manifest.from_bytes(self.store.get(digest))
            for missing in self.store.missing(manifest.chunk_digests()):
                self._download(missing)
            self.store.sync()
            return unpack(manifest, self.store.get)

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

    def upload(self, value: Any) -> int:
        """Upload the manifests ``value`` references and the chunks the server lacks; return bytes sent."""
        sent = 0
        for digest in refs_in(value):
            manifest = Manifest.from_bytes(self.store.get(digest))
            for missing in self.api.missing_chunks([*manifest.chunk_digests(), digest]):
                data = self.store.get(missing)
                self.api.put_chunk(missing, data)
                sent += len(data)
        self.bytes_out += sent
        return sent
