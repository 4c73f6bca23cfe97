"""Typed calls to a fedlog server: ``SiteApi`` for a site's routes, ``AdminApi`` for jobs.

Both are thin: one method per route, over any ``Transport`` (``HttpTransport`` for
real sockets, ``AsgiTransport`` to run the same client against the app in-process).
Errors are the transport's: ``TransportError`` when no answer came, ``RemoteError`` /
``AuthError`` when the server said no.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from engine.chunks.base import Buffer
from engine.chunks.wire import CHUNKS_HEADER, LENGTHS_HEADER, batches
from engine.client.errors import TransportError
from engine.client.transport import HttpTransport, Transport
from engine.provision import load_identity

__all__ = ["AdminApi", "SiteApi", "get_chunks", "put_chunks", "transport_for"]


def transport_for(identity_dir: str | Path, server_url: str | None = None, *, timeout: float = 60.0
                  ) -> tuple[HttpTransport, str]:
    """An HTTP transport for a provisioned identity folder, and the identity's name."""
    ident = load_identity(identity_dir)
    url = server_url or ident.server_url
    return HttpTransport(url, ident.token, tls_ca=ident.ca_cert if url.startswith("https") else None,
                         timeout=timeout), ident.name


def get_chunks(transport: Transport, digests: list[str], into: Callable[[int], memoryview] | None = None
               ) -> list[memoryview]:
    """``POST /v1/chunks/fetch``: the chunks' bytes, in order (views into the answers' bodies).

    The server may answer with fewer chunks than asked (it caps an answer's bytes); the rest
    is asked for again, so the caller always gets every chunk or an error. ``into``: where
    the answers are read (see ``Transport.request``).
    """
    out: list[memoryview] = []
    extra: dict[str, Any] = {"into": into} if into is not None else {}
    while len(out) < len(digests):
        resp = transport.request("POST", "/v1/chunks/fetch", json={"digests": digests[len(out):]}, **extra)
        lengths = _lengths(resp.headers.get(LENGTHS_HEADER.lower(), ""), len(resp.body))
        if not lengths or len(out) + len(lengths) > len(digests):
            raise TransportError("POST", "/v1/chunks/fetch", f"the answer's {LENGTHS_HEADER} header names "
                                 f"{len(lengths)} chunk(s) for {len(digests) - len(out)} asked", maybe_processed=False)
        view = memoryview(resp.body)
        offset = 0
        for length in lengths:
            out.append(view[offset:offset + length])
            offset += length
    return out


def _lengths(header: str, body_len: int) -> list[int]:
    try:
        lengths = [int(x) for x in header.split(",")] if header else []
    except ValueError:
        lengths = []
    if sum(lengths) != body_len or any(n < 0 for n in lengths):
        raise TransportError("POST", "/v1/chunks/fetch", f"the answer's {LENGTHS_HEADER} header {header[:80]!r} does "
                             f"not add up to its {body_len}-byte body", maybe_processed=False)
    return lengths


def put_chunks(transport: Transport, chunks: list[tuple[str, Buffer]]) -> None:
    """``POST /v1/chunks/upload``: several chunks in as few requests as the batch limits allow."""
    for start, end in batches([len(data) for _, data in chunks]):
        batch = chunks[start:end]
        header = ",".join(f"{digest}:{len(data)}" for digest, data in batch)
        # the pieces go out one after another, never joined into one buffer
        transport.request("POST", "/v1/chunks/upload", body=[data for _, data in batch],
                          headers={CHUNKS_HEADER: header})


def _seg(value: str) -> str:
    return quote(value, safe="")


class SiteApi:
    """The routes a site calls, as the site ``site``."""

    def __init__(self, transport: Transport, site: str) -> None:
        self.transport = transport
        self.site = site
        self._base = f"/v1/sites/{_seg(site)}"

    def poll(self, wait: float) -> dict[str, Any]:
        """Wait up to ``wait`` seconds for the next assignment: ``{"assignment", "job", "site_state"}``."""
        resp = self.transport.request("POST", self._base + "/poll", query={"wait": wait}, timeout=wait + 30)
        answer: dict[str, Any] = resp.json()
        return answer

    def submit(self, task_id: str, client_task_id: str, result: Any) -> dict[str, Any]:
        """Submit a result (idempotent: the assignment id is the key): ``{"outcome", "counted"}``."""
        resp = self.transport.request("POST", f"{self._base}/assignments/{_seg(client_task_id)}/result",
                                      json={"task_id": task_id, "result": result})
        answer: dict[str, Any] = resp.json()
        return answer

    def check(self, client_task_id: str) -> dict[str, Any]:
        """Where an assignment stands (``active`` says whether to keep working on it)."""
        answer: dict[str, Any] = self.transport.request(
            "GET", f"{self._base}/assignments/{_seg(client_task_id)}").json()
        return answer

    def missing_chunks(self, digests: list[str]) -> list[str]:
        """Which of ``digests`` the server lacks."""
        missing: list[str] = self.transport.request("POST", "/v1/chunks/missing", json={"digests": digests}).json()[
            "missing"]
        return missing

    def put_chunk(self, digest: str, data: Buffer) -> None:
        """Upload one chunk (the server verifies it against its address)."""
        self.transport.request("PUT", f"/v1/chunks/{digest}", body=data)

    def get_chunk(self, digest: str) -> bytes:
        """Download one chunk granted to this site."""
        return bytes(self.transport.request("GET", f"/v1/chunks/{digest}").body)  # read whole: bytes already

    def get_chunks(self, digests: list[str], into: Callable[[int], memoryview] | None = None) -> list[memoryview]:
        """Download several chunks granted to this site, in one request per answer the server gives."""
        return get_chunks(self.transport, digests, into)

    def put_chunks(self, chunks: list[tuple[str, Buffer]]) -> None:
        """Upload several chunks in one request (the server verifies all before storing any)."""
        put_chunks(self.transport, chunks)

    def report_stream(self, session: str, event: str, data: dict[str, Any]) -> str:
        """Tell the server how one of its task-data sessions to this site moved; return its state there."""
        resp = self.transport.request("POST", f"{self._base}/streams/{_seg(session)}", json={"event": event, **data})
        return str(resp.json()["state"])

    def heartbeat(self) -> str:
        """An explicit heartbeat; returns the site's liveness state."""
        return str(self.transport.request("POST", self._base + "/heartbeat").json()["site_state"])


class AdminApi:
    """The admin's routes: jobs and sites."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport

    def submit_job(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Submit a job spec; returns the job as stored (``job_id``, ``state``...)."""
        answer: dict[str, Any] = self.transport.request("POST", "/v1/jobs", json=spec).json()
        return answer

    def list_jobs(self) -> list[dict[str, Any]]:
        """Every job, oldest first."""
        jobs: list[dict[str, Any]] = self.transport.request("GET", "/v1/jobs").json()["jobs"]
        return jobs

    def show_job(self, job_id: str) -> dict[str, Any]:
        """One job and its progress."""
        answer: dict[str, Any] = self.transport.request("GET", f"/v1/jobs/{_seg(job_id)}").json()
        return answer

    def watch_job(self, job_id: str, seen: str | None, wait: float) -> tuple[dict[str, Any], str | None]:
        """(job, its ETag) once the job differs from the ``seen`` ETag, or after ``wait`` seconds (long poll)."""
        query: dict[str, str | float] = {"wait": wait}
        if seen is not None:
            query["seen"] = seen
        resp = self.transport.request("GET", f"/v1/jobs/{_seg(job_id)}", query=query, timeout=wait + 30)
        tag = resp.headers.get("etag")
        return resp.json(), tag.strip('"') if tag else None

    def job_result(self, job_id: str) -> dict[str, Any]:
        """A job's result (``result`` is null until it finished)."""
        answer: dict[str, Any] = self.transport.request("GET", f"/v1/jobs/{_seg(job_id)}/result").json()
        return answer

    def abort_job(self, job_id: str, reason: str | None = None) -> dict[str, Any]:
        """Abort a job that has not ended."""
        body = {"reason": reason} if reason else {}
        answer: dict[str, Any] = self.transport.request("POST", f"/v1/jobs/{_seg(job_id)}/abort", json=body).json()
        return answer

    def stats(self) -> dict[str, Any]:
        """Traffic and boot figures of the server process."""
        answer: dict[str, Any] = self.transport.request("GET", "/v1/stats").json()
        return answer

    def sites(self) -> list[dict[str, Any]]:
        """The provisioned sites and their liveness."""
        sites: list[dict[str, Any]] = self.transport.request("GET", "/v1/sites").json()["sites"]
        return sites
