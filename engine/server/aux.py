"""Aux messages: requests between sites of a job (relayed by the server) and to the server itself.

The reference's ``send_aux_request`` family. A site posts a request for one or more
targets; each (request, target) is an ``aux`` machine in the server's log, recorded
*before* it is delivered. A site target finds it in its mailbox on its next aux poll
(``deliver``), answers with ``reply``, and the sender, waiting on its request, gets
every target's envelope ``{"status", "reply"}``:

- ``ok``: the target's handler answered (``reply`` is its JSON value);
- ``no_handler`` / ``error``: the target has no handler for the topic, or it raised;
- ``timeout``: no answer within the request's timeout (recorded as ``timed_out``);
- ``refused``: the target is not a site of the sender's job (recorded as ``refused``);
- ``sent``: a fire-and-forget request was queued (closed once delivered).

A request naming tensor payloads (``{"$tensors": <manifest>}``) that the sender
uploaded or was given lets its targets download them (``ChunkAccess.share``). The
grants are memory, so each target's recorded request lists what was shared
(``shared``) and a restarted server grants it again at boot (``restore_shares``).

Sites may address only sites of a job they belong to (the running job's sites), and
only the addressed site can take a request from its mailbox or reply to it. Mailboxes
are memory: after a server restart undelivered requests time out on their recorded
deadlines and the sender retries if it wants to.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from engine.errors import ConcurrencyConflict, ConfigError, TransitionRejected
from engine.server.auth import ANY_ROLE
from engine.server.http import HttpError, Request, Response, json_response
from engine.server.routing import QueryParam, Route, Router
from engine.tasks.spec import as_json

if TYPE_CHECKING:
    from engine.server.service import FedServer

__all__ = ["SERVER_TARGET", "AuxHub", "aux_router"]

logger = logging.getLogger(__name__)

KIND = "aux"
#: the target name that addresses the server itself
SERVER_TARGET = "server"
MAX_TIMEOUT_S = 300.0
MAX_POLL_WAIT_S = 30.0
US = 1_000_000

#: a server-side handler: (topic, request, sender) -> JSON reply (or an awaitable of it)
ServerHandler = Callable[[str, Any, str], Any]


@dataclass
class _Pending:
    machine_id: str
    request_id: str
    job_id: str
    sender: str
    target: str
    topic: str
    request: Any
    deadline_us: int
    fire_and_forget: bool
    reply: asyncio.Future[dict[str, Any]] = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    def message(self) -> dict[str, Any]:
        return {"machine_id": self.machine_id, "request_id": self.request_id, "job_id": self.job_id,
                "sender": self.sender, "topic": self.topic, "request": self.request,
                "fire_and_forget": self.fire_and_forget}


class AuxHub:
    """Mailboxes, waiting senders and the server's own handlers, on the server's loop."""

    def __init__(self, server: FedServer) -> None:
        self.server = server
        self.runtime = server.runtime
        self._mailboxes: dict[str, list[_Pending]] = {}
        self._signals: dict[str, asyncio.Event] = {}
        #: per site, the newest polling process (its ``instance``): older long polls are stale
        self._instances: dict[str, str] = {}
        self._pending: dict[str, _Pending] = {}
        self._handlers: dict[str, ServerHandler] = {}

    def register_handler(self, topic: str, handler: ServerHandler) -> None:
        """Answer requests addressed to the server on ``topic``; one handler per topic."""
        if not isinstance(topic, str) or not topic:
            raise ConfigError(f"an aux topic must be a non-empty string, got {topic!r}")
        if not callable(handler):
            raise ConfigError(f"the handler for aux topic {topic!r} must be callable, got {handler!r}")
        if topic in self._handlers:
            raise ConfigError(f"aux topic {topic!r} already has a server handler ({self._handlers[topic]!r})")
        self._handlers[topic] = handler

    # -- sending -----------------------------------------------------------------------------

    def job_sites(self, job_id: str) -> list[str]:
        """The sites of a job that is running (empty for any other job)."""
        try:
            info = self.server.jobs.show(job_id, detail=False)
        except Exception:  # noqa: BLE001 - an unknown job has no sites
            return []
        return list(info.sites) if info.state == "running" else []

    async def send(self, sender: str, job_id: str, targets: list[str], topic: str, request: Any,
                   timeout: float, fire_and_forget: bool) -> dict[str, Any]:
        """Record and deliver one request to each target; wait for the replies unless fire-and-forget."""
        members = self.job_sites(job_id)
        if sender not in members:
            raise HttpError(403, "not_in_job", f"{sender} is not a site of running job {job_id!r}; "
                                               "aux messages stay within a job")
        clock = self.server.clock
        request_id = clock.new_id()
        deadline = clock.now_us() + round(timeout * US)
        replies: dict[str, Any] = {}
        waiting: list[_Pending] = []
        # payloads the request names (a submission, a learn task) become readable by its site targets
        shared = self.server.chunk_access.share(sender, [t for t in targets if t in members and t != sender],
                                                request)
        for target in dict.fromkeys(targets):
            machine_id = f"{job_id}.aux.{request_id}/{target}"
            data = {"request_id": request_id, "sender": sender, "target": target, "topic": topic,
                    "request": request, "timeout": timeout, "fire_and_forget": fire_and_forget}
            if shared and target in members and target != sender:
                data["shared"] = shared  # grants are memory: a restarted server re-grants these (restore_shares)
            await self.runtime.create_async(KIND, machine_id=machine_id, data=data, job_id=job_id,
                                            site=None if target == SERVER_TARGET else target, deadline_us=deadline)
            if target != SERVER_TARGET and target not in members:
                reason = f"{target!r} is not a site of job {job_id}"
                await self._finish(machine_id, "refuse", {"reason": reason})
                replies[target] = {"status": "refused", "reply": None, "reason": reason}
                continue
            if target == SERVER_TARGET:
                replies[target] = await self._serve(machine_id, sender, topic, request)
                continue
            pending = _Pending(machine_id, request_id, job_id, sender, target, topic, request, deadline,
                               fire_and_forget)
            self._pending[machine_id] = pending
            self._mailboxes.setdefault(target, []).append(pending)
            self._wake(target)
            if fire_and_forget:
                replies[target] = {"status": "sent", "reply": None}
            else:
                waiting.append(pending)
        if waiting:
            done, _ = await asyncio.wait([p.reply for p in waiting], timeout=timeout)
            for p in waiting:
                if p.reply in done:
                    replies[p.target] = p.reply.result()
                else:
                    await self._expire(p)
                    replies[p.target] = {"status": "timeout", "reply": None}
        return {"request_id": request_id, "replies": replies}

    def restore_shares(self, job_id: str) -> int:
        """Re-grant what the job's recorded aux requests shared (a restarted server lost its grants).

        Only the digests recorded as shared are granted: they were checked when the request
        was made (the sender could read them), so naming an address is still not holding it.
        Returns how many (request, target) grants were restored.
        """
        restored = 0
        grants: set[tuple[str, str, str]] = set()  # a payload shared in many requests is granted once
        for event in self.server.recorder.read(job_id=job_id):
            data = event.data or {}
            if event.kind != KIND or event.trigger != "create" or not data.get("shared"):
                continue
            grants.update((str(data["sender"]), str(data["target"]), str(d)) for d in data["shared"])
            restored += 1
        access = self.server.chunk_access
        for sender, target, digest in grants:
            access.note_upload(sender, digest)
            access.grant(target, {"$tensors": digest})
        return restored

    async def _serve(self, machine_id: str, sender: str, topic: str, request: Any) -> dict[str, Any]:
        handler = self._handlers.get(topic)
        if handler is None:
            envelope: dict[str, Any] = {"status": "no_handler", "reply": None}
        else:
            try:
                value = handler(topic, request, sender)
                if inspect.isawaitable(value):
                    value = await value
                envelope = {"status": "ok", "reply": as_json(value, "reply")}
            except Exception as exc:  # noqa: BLE001 - the handler's failure is the requester's answer
                logger.exception("server aux handler for %r failed", topic)
                envelope = {"status": "error", "reply": None, "reason": f"{type(exc).__name__}: {exc}"}
        await self._finish(machine_id, "reply", envelope)
        return envelope

    async def _expire(self, pending: _Pending) -> None:
        self._forget(pending)
        await self._finish(pending.machine_id, "timeout", {"reason": "no reply before the timeout"})

    async def _finish(self, machine_id: str, trigger: str, data: dict[str, Any]) -> bool:
        try:
            await self.runtime.fire_async(machine_id, trigger, data)
        except (TransitionRejected, ConcurrencyConflict):
            # its timer (on the runtime's timer thread) or another ending was first; the log says how it ended
            return False
        return True

    def _forget(self, pending: _Pending) -> None:
        self._pending.pop(pending.machine_id, None)
        box = self._mailboxes.get(pending.target, [])
        if pending in box:
            box.remove(pending)

    # -- the target's side -----------------------------------------------------------------------

    def _wake(self, site: str) -> None:
        signal = self._signals.pop(site, None)
        if signal is not None:
            signal.set()

    async def take(self, site: str, wait: float, instance: str | None = None) -> list[dict[str, Any]]:
        """The requests waiting for ``site`` (recorded as delivered); waits up to ``wait`` s for one.

        ``instance`` names the polling process. A poll from a new instance (the site was
        restarted) ends the long polls of the older one at once, empty: their connection
        may belong to a killed process, and a request handed to it would be lost.
        """
        loop = asyncio.get_running_loop()
        end = loop.time() + wait
        if instance is not None and self._instances.get(site) != instance:
            self._instances[site] = instance
            self._wake(site)  # a waiting poll of the previous instance returns
        while True:
            if instance is not None and self._instances.get(site) != instance:
                return []
            box = self._mailboxes.get(site) or []
            now = self.server.clock.now_us()
            live = [p for p in box if p.deadline_us > now]
            for p in box:
                if p.deadline_us <= now:
                    await self._expire(p)
            if live:
                self._mailboxes[site] = []
                out = []
                for p in live:
                    if not await self._finish(p.machine_id, "deliver", {"to": site}):
                        self._forget(p)
                        continue
                    out.append(p.message())
                    if p.fire_and_forget:
                        self._forget(p)
                        await self._finish(p.machine_id, "close", {})
                return out
            left = end - loop.time()
            if left <= 0 or self.server.closing:
                return []
            signal = self._signals.setdefault(site, asyncio.Event())
            try:
                await asyncio.wait_for(signal.wait(), left)
            except TimeoutError:
                return []

    async def answer(self, site: str, machine_id: str, status: str, reply: Any) -> None:
        """Record ``site``'s reply to a request delivered to it and hand it to the waiting sender."""
        pending = self._pending.get(machine_id)
        row = self.server.recorder.get_machine(machine_id)
        if row is None or row.kind != KIND or row.site != site:
            raise HttpError(404, "unknown_request", f"{site} has no aux request {machine_id!r}")
        envelope = {"status": status, "reply": reply}
        if not await self._finish(machine_id, "reply", envelope):
            state = self.runtime.get(machine_id).state
            raise HttpError(409, "request_over", f"aux request {machine_id!r} is already {state}",
                            details={"state": state})
        if pending is not None:
            self._forget(pending)
            if not pending.reply.done():
                pending.reply.set_result(envelope)

    def release(self) -> None:
        """Wake every waiting poll (shutdown)."""
        for site in list(self._signals):
            self._wake(site)


# -- routes ------------------------------------------------------------------------------------

_TARGET = {"type": "string", "minLength": 1, "maxLength": 63}
SEND_REQUEST = {
    "type": "object", "required": ["job_id", "targets", "topic"], "additionalProperties": False,
    "properties": {
        "job_id": {"type": "string", "minLength": 1}, "targets": {"type": "array", "items": _TARGET, "minItems": 1},
        "topic": {"type": "string", "minLength": 1, "maxLength": 200}, "request": {},
        "timeout": {"type": "number", "minimum": 0, "maximum": MAX_TIMEOUT_S},
        "fire_and_forget": {"type": "boolean"},
    },
}
REPLY_REQUEST = {
    "type": "object", "required": ["machine_id", "status"], "additionalProperties": False,
    "properties": {"machine_id": {"type": "string"}, "status": {"enum": ["ok", "no_handler", "error"]},
                   "reply": {}},
}


def _hub(request: Request) -> AuxHub:
    hub: AuxHub = request.app.state.aux
    return hub


async def send_request(request: Request) -> Response:
    """Send an aux request to sites of the sender's job (or the server) and wait for the replies."""
    site = request.path_params["site"]
    request.require_identity(site)
    body = await request.json()
    timeout = float(body.get("timeout", 10.0))
    result = await _hub(request).send(site, body["job_id"], list(body["targets"]), body["topic"],
                                      body.get("request"), timeout, bool(body.get("fire_and_forget", False)))
    return json_response(result)


async def poll_requests(request: Request) -> Response:
    """Take the aux requests waiting for this site (long poll)."""
    site = request.path_params["site"]
    request.require_identity(site)
    wait = min(float(request.params["wait"]), MAX_POLL_WAIT_S)
    instance = request.params.get("instance")
    return json_response({"requests": await _hub(request).take(site, wait, str(instance) if instance else None)})


async def send_reply(request: Request) -> Response:
    """Reply to an aux request delivered to this site."""
    site = request.path_params["site"]
    request.require_identity(site)
    body = await request.json()
    await _hub(request).answer(site, body["machine_id"], body["status"], body.get("reply"))
    return json_response({"recorded": True})


def aux_router() -> Router:
    """The aux message routes."""
    base = "/v1/sites/{site}/aux"
    return Router([
        Route("POST", base + "/requests", send_request, "Send an aux request within the site's job",
              roles=ANY_ROLE, body="json", request_schema=SEND_REQUEST,
              response_schema={"type": "object", "required": ["request_id", "replies"]}, tags=("aux",),
              errors=(403,)),
        Route("POST", base + "/poll", poll_requests, "Take the aux requests waiting for the site",
              roles=ANY_ROLE, query=(QueryParam("wait", "number", default=10.0, minimum=0,
                                                maximum=MAX_POLL_WAIT_S),
                                     QueryParam("instance", "string",
                                                description="the polling process; a new one ends the old's polls")),
              response_schema={"type": "object", "required": ["requests"]}, tags=("aux",)),
        Route("POST", base + "/replies", send_reply, "Reply to an aux request delivered to the site",
              roles=ANY_ROLE, body="json", request_schema=REPLY_REQUEST,
              response_schema={"type": "object", "required": ["recorded"]}, tags=("aux",), errors=(404, 409)),
    ])

