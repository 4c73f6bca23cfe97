"""The site's engine API (the reference's ``ClientRunManager`` role), handed to executors as ``task.engine``.

One ``SiteEngine`` per job on a site. It answers the questions an executor asks
about its job (``get_job_clients``, ``get_task_assignment``) and carries aux
messages: requests to other sites of the job (relayed and recorded by the server)
or to the server (target ``"server"``), and, in a background thread started by
``start()``, requests addressed to this site, dispatched to the handler registered
for their topic::

    def on_ping(topic, request, sender):
        return {"pong": request}

    task.engine.register_aux_message_handler("ping", on_ping)
    replies = task.engine.send_aux_request(["site-2"], "ping", {"n": 1}, timeout=5)
    # {"site-2": {"status": "ok", "reply": {"pong": {"n": 1}}}}

Reply envelopes carry ``status`` (``ok``, ``no_handler``, ``error``, ``timeout``,
``refused``, ``sent``) and ``reply``. Every request and its outcome is an ``aux``
machine in the server's log.

It is also a ``StreamableEngine``: ``stream_objects`` / ``register_stream_processing``
between sites of the job travel as aux messages on a reserved topic, each target at
its own pace (``engine.streams.objects``); with a ``runtime`` (the agent passes the
site's own) every stream is recorded in the site's log.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import quote

from engine.client.transport import Transport
from engine.errors import ConfigError, EngineError, TaskError
from engine.machines.runtime import Runtime
from engine.streams.objects import (
    STREAM_TOPIC,
    ConsumerFactory,
    ObjectProducer,
    ObjectStreamer,
    StreamableEngine,
    StreamContext,
)
from engine.tasks.spec import as_json, check_seconds

__all__ = ["AuxHandler", "SiteEngine"]

logger = logging.getLogger(__name__)

#: this process, as its aux polls name it: after a restart the server drops the dead process's polls
INSTANCE = uuid.uuid4().hex

#: an aux handler: (topic, request, sender) -> JSON reply
AuxHandler = Callable[[str, Any, str], Any]


class SiteEngine(StreamableEngine):
    """A site's view of one job: its sites, its current assignment, aux messages, object streams.

    Args:
        transport: the site's transport (its own credential).
        site: the site's name.
        job_id: the job this engine serves.
        job_sites: the job's sites.
        assignment_getter: returns the assignment being executed (``get_task_assignment``).
        abort: called by ``abort_app(reason)``.
        poll_wait: seconds each aux poll waits for requests.
        runtime: the site's runtime, where object streams are recorded (None: not recorded).
    """

    def __init__(self, transport: Transport, site: str, *, job_id: str, job_sites: list[str] | tuple[str, ...],
                 assignment_getter: Callable[[], Any] | None = None, abort: Callable[[str], None] | None = None,
                 poll_wait: float = 5.0, runtime: Runtime | None = None) -> None:
        self.transport = transport
        self.runtime = runtime
        self._streamer: ObjectStreamer | None = None
        self.site = site
        self.job_id = job_id
        self.job_sites = sorted(job_sites)
        self._assignment_getter = assignment_getter
        self._abort = abort
        self.poll_wait = poll_wait
        self._handlers: dict[str, AuxHandler] = {}
        #: topics whose handlers run on worker threads (``concurrent=True``)
        self._concurrent: set[str] = set()
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.aborted: str | None = None
        #: the agent's payload mover (chunk store, API, log), for executors that move tensors themselves
        self.payloads: Any = None
        self._base = f"/v1/sites/{quote(site, safe='')}/aux"

    # -- the job ---------------------------------------------------------------------------

    def get_job_clients(self) -> list[str]:
        """The sites of the job (sorted)."""
        return list(self.job_sites)

    def get_task_assignment(self) -> Any:
        """The assignment (``SiteTask``) this site is executing, or None."""
        return self._assignment_getter() if self._assignment_getter is not None else None

    def abort_app(self, reason: str = "aborted by the site") -> None:
        """Stop taking aux requests and tell the agent (which stops the site) why."""
        self.aborted = reason
        self._stop.set()
        if self._abort is not None:
            self._abort(reason)

    # -- handlers ----------------------------------------------------------------------------

    def register_aux_message_handler(self, topic: str, func: AuxHandler, *, concurrent: bool = False) -> None:
        """Answer aux requests on ``topic`` with ``func(topic, request, sender)``; one handler per topic.

        Handlers run one at a time, in the order requests arrive, unless ``concurrent``
        (a fedlog addition): then each request runs on a worker thread, so a slow
        handler (one that downloads a submission) does not hold up the other topics.
        """
        if not isinstance(topic, str) or not topic:
            raise ConfigError(f"an aux topic must be a non-empty string, got {topic!r}")
        if not callable(func):
            raise ConfigError(f"the handler for aux topic {topic!r} must be callable, got {func!r}")
        with self._lock:
            if topic in self._handlers:
                raise ConfigError(f"aux topic {topic!r} already has a handler on {self.site} "
                                  f"({self._handlers[topic]!r})")
            self._handlers[topic] = func
            if concurrent:
                self._concurrent.add(topic)
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix=f"aux-{self.site}")

    # -- sending -------------------------------------------------------------------------------

    def _send(self, targets: list[str], topic: str, request: Any, timeout: float,
              fire_and_forget: bool) -> dict[str, Any]:
        if not isinstance(targets, list | tuple) or not targets or not all(isinstance(t, str) for t in targets):
            raise TaskError("targets", f"must be a non-empty list of site names (or 'server'), got {targets!r}")
        if not isinstance(topic, str) or not topic:
            raise TaskError("topic", f"must be a non-empty string, got {topic!r}")
        timeout = check_seconds(timeout, "timeout")
        body = {"job_id": self.job_id, "targets": list(targets), "topic": topic,
                "request": as_json(request, "request"), "timeout": timeout, "fire_and_forget": fire_and_forget}
        answer = self.transport.request("POST", self._base + "/requests", json=body, timeout=timeout + 30).json()
        replies: dict[str, Any] = answer["replies"]
        return replies

    def send_aux_request(self, targets: list[str], topic: str, request: Any, timeout: float = 10.0
                         ) -> dict[str, Any]:
        """Send ``request`` to each target and wait up to ``timeout`` s: ``{target: envelope}``."""
        return self._send(targets, topic, request, timeout, False)

    def multicast_aux_requests(self, topic: str, target_requests: Mapping[str, Any], timeout: float = 10.0
                               ) -> dict[str, Any]:
        """A different request per target, sent in parallel: ``{target: envelope}``."""
        if not isinstance(target_requests, Mapping) or not target_requests:
            raise TaskError("target_requests", f"must be a non-empty {{target: request}} mapping, "
                                               f"got {target_requests!r}")
        with ThreadPoolExecutor(max_workers=min(16, len(target_requests))) as pool:
            futures = {t: pool.submit(self._send, [t], topic, r, timeout, False) for t, r in target_requests.items()}
            return {t: f.result()[t] for t, f in futures.items()}

    def fire_and_forget_aux_request(self, targets: list[str], topic: str, request: Any) -> dict[str, Any]:
        """Queue ``request`` for each target without waiting for replies: ``{target: envelope}``."""
        return self._send(targets, topic, request, 60.0, True)

    # -- object streams (the reference's StreamableEngine) ------------------------------------------

    def streamer(self) -> ObjectStreamer:
        """This site's object streamer (made on first use; it answers the reserved stream topic)."""
        with self._lock:
            if self._streamer is None:
                def deliver(target: str, message: dict[str, Any], timeout: float) -> dict[str, Any]:
                    envelope: dict[str, Any] = self._send([target], STREAM_TOPIC, message, timeout, False)[target]
                    return envelope

                streamer = self._streamer = ObjectStreamer(self.site, deliver, self.runtime)
                self._handlers[STREAM_TOPIC] = lambda topic, request, sender: streamer.handle(sender, request)
            return self._streamer

    def stream_objects(self, channel: str, topic: str, stream_ctx: StreamContext, targets: list[str],
                       producer: ObjectProducer, optional: bool = False, secure: bool = False) -> Any:
        """Stream the producer's objects to sites of the job (see ``engine.streams.objects``)."""
        return self.streamer().stream_objects(channel, topic, stream_ctx, targets, producer, optional, secure)

    def register_stream_processing(self, channel: str, topic: str, factory: ConsumerFactory,
                                   stream_done_cb: Callable[..., None] | None = None, **cb_kwargs: Any) -> None:
        """Consume streams other sites send on (channel, topic)."""
        self.streamer().register_stream_processing(channel, topic, factory, stream_done_cb, **cb_kwargs)

    def shutdown_streamer(self) -> None:
        """Finalize this site's inbound streams (recorded as aborted); no new ones are accepted."""
        if self._streamer is not None:
            self._streamer.shutdown_streamer()

    # -- receiving ---------------------------------------------------------------------------------

    def start(self) -> SiteEngine:
        """Start taking this site's aux requests in a background thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name=f"aux-{self.site}", daemon=True)
            self._thread.start()
        return self

    @property
    def stopping(self) -> bool:
        """True once the site was asked to stop (long executors return early then)."""
        return self._stop.is_set()

    def stop(self) -> None:
        """Ask the background thread to stop after its current poll (does not wait)."""
        self._stop.set()

    def close(self) -> None:
        """Stop the background thread and wait for it (at most its current poll)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.poll_wait + 35)
            self._thread = None
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def serve_once(self, wait: float = 0.0) -> int:
        """Take and answer the waiting requests once; return how many (the thread's step, for tests)."""
        answer = self.transport.request("POST", self._base + "/poll", query={"wait": wait, "instance": INSTANCE},
                                        timeout=wait + 30).json()
        for message in answer["requests"]:
            if self._pool is not None and message.get("topic") in self._concurrent:
                self._pool.submit(self._dispatch, message)
            else:
                self._dispatch(message)
        return len(answer["requests"])

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                self.serve_once(self.poll_wait)
            except EngineError as exc:
                logger.info("%s: aux poll failed (%s); retrying", self.site, exc)
                self._stop.wait(0.5)

    def _dispatch(self, message: dict[str, Any]) -> None:
        topic = str(message["topic"])
        handler = self._handlers.get(topic)
        status, reply = "no_handler", None
        if handler is not None:
            try:
                reply = as_json(handler(topic, message.get("request"), str(message["sender"])), "reply")
                status = "ok"
            except Exception:  # noqa: BLE001 - the sender is told; the site goes on
                logger.exception("%s: aux handler for %r failed", self.site, topic)
                status = "error"
        if message.get("fire_and_forget"):
            return
        try:
            self.transport.request("POST", self._base + "/replies",
                                   json={"machine_id": message["machine_id"], "status": status, "reply": reply})
        except EngineError as exc:
            logger.info("%s: reply to %s not recorded: %s", self.site, message["machine_id"], exc)
