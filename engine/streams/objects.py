"""The reference streaming API: ``stream_objects`` / ``register_stream_processing``, producers, consumers.

The shape is the reference's ``StreamableEngine``: a sender calls
``stream_objects(channel, topic, stream_ctx, targets, producer)``; the producer's
``produce`` returns the next object (``None`` ends the stream) and a timeout for it;
every receiver has registered a ``ConsumerFactory`` for the (channel, topic) with
``register_stream_processing``, gets a fresh ``ObjectConsumer`` per stream, whose
``consume`` answers ``(keep going, reply)``; ``finalize`` is always called, and the
``stream_done_cb`` runs when a stream ends on the receiving side. The producer's
``process_replies`` sees each object's replies (``{target: reply}``); returning
anything but ``None`` ends the stream with that result. There is no ``fl_ctx``:
what it carried is on the engine.

What differs from the reference, on purpose:

- **Each target moves on its own.** The reference sends each object to all targets
  as one synchronous request, so the slowest receiver paces everyone and a dead one
  stops the stream. Here every target has its own sender thread; objects are produced
  once into a window of ``window`` objects and each target takes them at its own
  pace. A target that does not answer an object within that object's timeout (the
  per-entry timeout) or exceeds ``stream_timeout`` overall is dropped (its session
  fails, its reply is an error envelope) and the others go on.
- **Every stream is in the log.** The sender records one ``stream_send`` machine per
  target (``ss:<stream>:<target>``): ``offer`` (channel, topic, context), ``want``,
  ``start``, an ``ack`` per answered object, then ``complete``, ``fail`` or
  ``expire``. The receiver records ``stream_receive`` (``sr:<stream>:<receiver>``)
  with an ``ack`` per consumed object.
- **Re-delivery is idempotent.** Objects carry sequence numbers; a repeated sequence
  number (a retried request) gets the reply recorded for it without a second
  ``consume``; a gap is refused (``BAD_REQUEST``), as in the reference.

The transport is a ``deliver(target, message, timeout) -> envelope`` function: on a
site it is the server's aux relay (``SiteEngine``), in one process a direct call
(``LocalStreamNetwork``, for tests and for components that stream to themselves).
Tensors do not travel as stream objects: they go as content-addressed chunks over
stream sessions (``engine.streams.sessions``), which record the same two machines.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine.errors import ConcurrencyConflict, ConfigError, TransitionRejected
from engine.machines.runtime import Runtime

__all__ = ["RC_BAD_REQUEST", "RC_ERROR", "RC_NO_CONSUMER", "RC_TIMEOUT", "STREAM_TOPIC", "ConsumerFactory",
           "Deliver", "LocalStreamNetwork", "ObjectConsumer", "ObjectProducer", "ObjectStreamer",
           "StreamContext", "StreamContextKey", "StreamableEngine"]

logger = logging.getLogger(__name__)

#: the aux topic stream messages travel on between sites
STREAM_TOPIC = "__fedlog_stream__"
RC_NO_CONSUMER = "NO_CONSUMER"
RC_BAD_REQUEST = "BAD_REQUEST"
RC_ERROR = "EXECUTION_EXCEPTION"
RC_TIMEOUT = "TIMEOUT"

StreamContext = dict[str, Any]


class StreamContextKey:
    """Keys the streamer puts into every stream context (the reference's names)."""

    CHANNEL = "__channel__"
    TOPIC = "__topic__"
    RC = "__RC__"
    #: fedlog: the stream's id and the sending site
    STREAM_ID = "__stream_id__"
    SENDER = "__sender__"


class ObjectProducer(ABC):
    """Produces the objects of one stream and judges the receivers' replies."""

    @abstractmethod
    def produce(self, stream_ctx: StreamContext) -> tuple[Any, float]:
        """The next JSON-able object and the seconds each target may take to answer it; ``(None, _)`` ends."""

    @abstractmethod
    def process_replies(self, replies: dict[str, Any], stream_ctx: StreamContext) -> Any:
        """Replies to one object (``{target: reply}``); anything but None ends the stream with that result.

        A target that failed (timed out, refused, raised) is present with an error
        envelope ``{"rc": RC_..., "reason": ...}``.
        """


class ObjectConsumer(ABC):
    """Consumes one stream on a receiver; a new one per stream."""

    @abstractmethod
    def consume(self, obj: Any, stream_ctx: StreamContext) -> tuple[bool, Any]:
        """Take one object; return (keep streaming, JSON-able reply)."""

    def finalize(self, stream_ctx: StreamContext) -> None:  # noqa: B027 - optional hook
        """Called exactly once when the stream ends on this receiver, however it ends."""


class ConsumerFactory(ABC):
    """Makes consumers for the streams of one (channel, topic)."""

    @abstractmethod
    def get_consumer(self, stream_ctx: StreamContext) -> ObjectConsumer:
        """A new consumer for a new stream (called on its first object)."""

    def return_consumer(self, consumer: ObjectConsumer, stream_ctx: StreamContext) -> None:  # noqa: B027
        """The consumer is done (after ``finalize``)."""


class StreamableEngine(ABC):
    """What a streaming-capable engine offers (the reference's interface, without ``fl_ctx``)."""

    @abstractmethod
    def stream_objects(self, channel: str, topic: str, stream_ctx: StreamContext, targets: list[str],
                       producer: ObjectProducer, optional: bool = False, secure: bool = False) -> Any:
        """Stream the producer's objects to ``targets``; return the result ``process_replies`` ended with."""

    @abstractmethod
    def register_stream_processing(self, channel: str, topic: str, factory: ConsumerFactory,
                                   stream_done_cb: Callable[..., None] | None = None, **cb_kwargs: Any) -> None:
        """Handle streams on (channel, topic) with consumers from ``factory``."""

    @abstractmethod
    def shutdown_streamer(self) -> None:
        """Stop streaming: running streams to this engine are finalized and recorded as aborted."""


#: sends one stream message to a target and returns its envelope ``{"status": ..., "reply": ...}``
Deliver = Callable[[str, dict[str, Any], float], dict[str, Any]]


@dataclass
class _Target:
    name: str
    machine_id: str
    next_seq: int = 0
    done: bool = False


@dataclass
class _Inbound:
    machine_id: str
    consumer: ObjectConsumer
    factory: ConsumerFactory
    ctx: StreamContext
    done_cb: tuple[Callable[..., None], dict[str, Any]] | None
    next_seq: int = 0
    last_reply: Any = None
    touched: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)


class ObjectStreamer(StreamableEngine):
    """Sends and receives object streams for one participant (a site, or a component).

    Args:
        name: this participant (the receiver's name in its machine ids, the sender's in contexts).
        deliver: the transport to other participants.
        runtime: where the stream machines are recorded (None: not recorded).
        window: how many objects a fast target may run ahead of the slowest live one.
        stream_timeout: seconds one target's whole stream may take (None: no limit).
        idle_timeout: a receiving stream with no message for this long is finalized as failed.
        progress: called with (target, objects answered) after each answered object.
    """

    def __init__(self, name: str, deliver: Deliver, runtime: Runtime | None = None, *, window: int = 64,
                 stream_timeout: float | None = None, idle_timeout: float = 300.0,
                 progress: Callable[[str, int], None] | None = None) -> None:
        if window < 1:
            raise ConfigError(f"window must be at least 1 object, got {window!r}")
        self.name = name
        self.deliver = deliver
        self.runtime = runtime
        self.window = window
        self.stream_timeout = stream_timeout
        self.idle_timeout = idle_timeout
        self.progress = progress
        self._factories: dict[tuple[str, str], tuple[ConsumerFactory, Callable[..., None] | None, dict[str, Any]]] = {}
        self._inbound: dict[tuple[str, str], _Inbound] = {}
        self._lock = threading.Lock()
        self._closed = False

    # -- recording ---------------------------------------------------------------------------

    def _record(self, machine_id: str, trigger: str, data: dict[str, Any] | None = None) -> None:
        if self.runtime is None:
            return
        try:
            self.runtime.fire(machine_id, trigger, data)
        except (TransitionRejected, ConcurrencyConflict) as exc:
            # a timer stalled it while we waited: resume and record again
            if trigger not in ("resume", "fail", "expire", "abort") and self.runtime.get(machine_id).state == "stalled":
                self.runtime.fire(machine_id, "resume", {"reason": "a message arrived"})
                self.runtime.fire(machine_id, trigger, data)
            else:
                logger.info("stream %s: %s not recorded (%s)", machine_id, trigger, exc)

    def _open(self, kind: str, machine_id: str, data: dict[str, Any], timeout: float) -> None:
        if self.runtime is None:
            return
        self.runtime.create(kind, machine_id=machine_id, data={**data, "entry_timeout": timeout})
        self.runtime.fire(machine_id, "offer", {"channel": data["channel"], "topic": data["topic"]})
        self.runtime.fire(machine_id, "want", {"objects": "all"})
        self.runtime.fire(machine_id, "start", None)

    # -- sending -------------------------------------------------------------------------------

    def stream_objects(self, channel: str, topic: str, stream_ctx: StreamContext, targets: list[str],
                       producer: ObjectProducer, optional: bool = False, secure: bool = False) -> Any:
        if secure:
            raise ConfigError("secure=True (peer-to-peer encryption of the stream) is not supported; "
                              "streams travel over the server relay with each site's own credential")
        if not isinstance(targets, list | tuple) or not targets or not all(isinstance(t, str) and t for t in targets):
            raise ConfigError(f"targets must be a non-empty list of participant names, got {targets!r}")
        if not channel or not topic:
            raise ConfigError(f"a stream needs a channel and a topic, got {channel!r} / {topic!r}")
        if self._closed:
            raise ConfigError(f"the streamer of {self.name} is shut down")
        stream_id = uuid.uuid4().hex
        ctx: StreamContext = dict(stream_ctx or {})
        ctx.update({StreamContextKey.CHANNEL: channel, StreamContextKey.TOPIC: topic,
                    StreamContextKey.STREAM_ID: stream_id, StreamContextKey.SENDER: self.name})
        run = _OutboundRun(self, stream_id, channel, topic, ctx, list(dict.fromkeys(targets)), producer, optional)
        return run.run()

    # -- receiving -------------------------------------------------------------------------------

    def register_stream_processing(self, channel: str, topic: str, factory: ConsumerFactory,
                                   stream_done_cb: Callable[..., None] | None = None, **cb_kwargs: Any) -> None:
        if not isinstance(factory, ConsumerFactory):
            raise ConfigError(f"factory must be a ConsumerFactory, got {factory!r}")
        if stream_done_cb is not None and not callable(stream_done_cb):
            raise ConfigError(f"stream_done_cb must be callable, got {stream_done_cb!r}")
        with self._lock:
            if (channel, topic) in self._factories:
                raise ConfigError(f"streams on {channel}/{topic} already have a consumer factory")
            self._factories[(channel, topic)] = (factory, stream_done_cb, dict(cb_kwargs))

    def handle(self, sender: str, message: dict[str, Any]) -> dict[str, Any]:
        """Take one stream message from ``sender`` and answer it (the transport calls this)."""
        self.expire_idle()
        stream_id, seq, kind = str(message.get("stream_id")), message.get("seq"), message.get("kind", "data")
        key = (sender, stream_id)
        with self._lock:
            found = self._inbound.get(key)
            if found is None and kind == "data" and seq == 0:
                accepted = self._accept(sender, message)
                if isinstance(accepted, dict):
                    return accepted
                found = accepted
            if found is None:
                return {"rc": RC_BAD_REQUEST, "continue": False,
                        "reason": f"no stream {stream_id} from {sender} on {self.name}"}
            inbound = found
        with inbound.lock:
            inbound.touched = time.monotonic()
            if kind in ("end", "abort"):
                self._close(key, inbound, "complete" if kind == "end" else "abort",
                            {"objects": inbound.next_seq, "reason": message.get("reason")})
                return {"continue": False, "reply": None}
            if not isinstance(seq, int) or seq > inbound.next_seq or seq < inbound.next_seq - 1:
                return {"rc": RC_BAD_REQUEST, "continue": False,
                        "reason": f"object {seq!r} out of order (expected {inbound.next_seq})"}
            if seq == inbound.next_seq - 1:
                return {"continue": True, "reply": inbound.last_reply, "repeated": True}
            try:
                keep, reply = inbound.consumer.consume(message.get("obj"), inbound.ctx)
            except Exception as exc:  # noqa: BLE001 - the sender is told; the stream ends here
                logger.exception("%s: consumer of stream %s raised", self.name, stream_id)
                self._close(key, inbound, "fail", {"reason": f"consumer raised {type(exc).__name__}: {exc}"})
                return {"rc": RC_ERROR, "continue": False, "reason": f"{type(exc).__name__}: {exc}"}
            inbound.next_seq += 1
            inbound.last_reply = reply
            self._record(inbound.machine_id, "ack", {"seq": seq})
            if not keep:
                self._close(key, inbound, "complete", {"objects": inbound.next_seq, "reason": "the consumer ended it"})
            return {"continue": bool(keep), "reply": reply}

    def _accept(self, sender: str, message: dict[str, Any]) -> _Inbound | dict[str, Any]:
        channel, topic = str(message.get("channel")), str(message.get("topic"))
        found = self._factories.get((channel, topic))
        if found is None or self._closed:
            return {"rc": RC_NO_CONSUMER, "continue": False,
                    "reason": f"{self.name} has no consumer factory for {channel}/{topic}"}
        factory, done_cb, cb_kwargs = found
        ctx = dict(message.get("ctx") or {})
        consumer = factory.get_consumer(ctx)
        machine_id = f"sr:{message['stream_id']}:{self.name}"
        self._open("stream_receive", machine_id, {"sender": sender, "channel": channel, "topic": topic},
                   float(message.get("timeout") or 60.0))
        inbound = _Inbound(machine_id, consumer, factory, ctx, (done_cb, cb_kwargs) if done_cb else None)
        self._inbound[(sender, str(message["stream_id"]))] = inbound
        return inbound

    def _close(self, key: tuple[str, str], inbound: _Inbound, trigger: str, data: dict[str, Any]) -> None:
        with self._lock:
            if self._inbound.pop(key, None) is None:
                return
        try:
            inbound.consumer.finalize(inbound.ctx)
        finally:
            inbound.factory.return_consumer(inbound.consumer, inbound.ctx)
            self._record(inbound.machine_id, trigger, data)
            if inbound.done_cb is not None:
                cb, kwargs = inbound.done_cb
                inbound.ctx[StreamContextKey.RC] = "OK" if trigger == "complete" else trigger.upper()
                cb(inbound.ctx, **kwargs)

    def expire_idle(self) -> int:
        """Finalize receiving streams idle past ``idle_timeout`` (their sender died); return how many."""
        now = time.monotonic()
        with self._lock:
            stale = [(k, s) for k, s in self._inbound.items() if now - s.touched > self.idle_timeout]
        for key, inbound in stale:
            self._close(key, inbound, "expire", {"reason": f"no message for {self.idle_timeout} s"})
        return len(stale)

    def shutdown_streamer(self) -> None:
        self._closed = True
        with self._lock:
            running = list(self._inbound.items())
        for key, inbound in running:
            self._close(key, inbound, "abort", {"reason": "the receiver shut its streamer down"})


class _OutboundRun:
    """One ``stream_objects`` call: a producer, a window of objects, a sender thread per target."""

    def __init__(self, streamer: ObjectStreamer, stream_id: str, channel: str, topic: str, ctx: StreamContext,
                 targets: list[str], producer: ObjectProducer, optional: bool) -> None:
        self.s = streamer
        self.stream_id = stream_id
        self.channel = channel
        self.topic = topic
        self.ctx = ctx
        self.producer = producer
        self.optional = optional
        self.targets = {t: _Target(t, f"ss:{stream_id}:{t}") for t in targets}
        self.objects: dict[int, tuple[Any, float]] = {}
        self.replies: dict[int, dict[str, Any]] = {}
        self.produced = 0
        self.ended = False
        self.stopped = False
        self.cond = threading.Condition()
        self.started = time.monotonic()

    def _live(self) -> list[_Target]:
        return [t for t in self.targets.values() if not t.done]

    def run(self) -> Any:
        for t in self.targets.values():
            self.s._open("stream_send", t.machine_id, {"target": t.name, "channel": self.channel,
                                                        "topic": self.topic, "stream_id": self.stream_id}, 60.0)
        threads = [threading.Thread(target=self._send_loop, args=(t,), name=f"stream-{t.name}", daemon=True)
                   for t in self.targets.values()]
        for th in threads:
            th.start()
        result: Any = None
        processed = 0
        try:
            while True:
                with self.cond:
                    while True:
                        live = self._live()
                        floor = min((t.next_seq for t in live), default=self.produced)
                        can_produce = (bool(live) and not self.ended and not self.stopped
                                       and self.produced - floor < self.s.window)
                        ready = processed < self.produced and self._answered(processed)
                        if can_produce or ready or not live or self.stopped:
                            break
                        self.cond.wait(0.5)
                if ready:
                    replies = self.replies.pop(processed)
                    self.objects.pop(processed, None)
                    processed += 1
                    outcome = self.producer.process_replies(replies, self.ctx)
                    if outcome is not None:
                        result = outcome
                        with self.cond:
                            self.stopped = True
                            self.cond.notify_all()
                        break
                    continue
                if can_produce:
                    obj, timeout = self.producer.produce(self.ctx)
                    with self.cond:
                        if obj is None:
                            self.ended = True
                        else:
                            self.objects[self.produced] = (obj, float(timeout))
                            self.replies[self.produced] = {}
                            self.produced += 1
                        self.cond.notify_all()
                    continue
                if not self._live() and processed >= self.produced:
                    break
                if self.stopped:
                    break
        finally:
            with self.cond:
                self.stopped = self.stopped or result is not None
                self.ended = True
                self.cond.notify_all()
            for th in threads:
                th.join()
        return result

    def _answered(self, seq: int) -> bool:
        got = self.replies.get(seq, {})
        return all(t.name in got for t in self.targets.values() if not t.done)

    def _fail(self, t: _Target, reason: str, rc: str, trigger: str = "fail") -> None:
        with self.cond:
            t.done = True
            for seq in range(t.next_seq, self.produced):
                self.replies.setdefault(seq, {})[t.name] = {"rc": rc, "reason": reason}
            self.cond.notify_all()
        self.s._record(t.machine_id, trigger, {"reason": reason, "answered": t.next_seq})
        level = logging.INFO if self.optional else logging.WARNING
        logger.log(level, "stream %s to %s: %s", self.stream_id, t.name, reason)

    def _send_loop(self, t: _Target) -> None:
        deadline = None if self.s.stream_timeout is None else self.started + self.s.stream_timeout
        while True:
            with self.cond:
                while t.next_seq >= self.produced and not self.ended and not self.stopped:
                    self.cond.wait(0.5)
                if self.stopped or (t.next_seq >= self.produced and self.ended):
                    break
                seq = t.next_seq
                obj, timeout = self.objects[seq]
            if deadline is not None and time.monotonic() > deadline:
                self._fail(t, f"stream_timeout of {self.s.stream_timeout} s passed", RC_TIMEOUT, "expire")
                return
            message: dict[str, Any] = {"stream_id": self.stream_id, "channel": self.channel, "topic": self.topic,
                                       "seq": seq, "kind": "data", "obj": obj, "timeout": timeout}
            if seq == 0:
                message["ctx"] = self.ctx
            try:
                envelope = self.s.deliver(t.name, message, timeout)
            except Exception as exc:  # noqa: BLE001 - the transport failed for this target only
                self._fail(t, f"delivery failed: {type(exc).__name__}: {exc}", RC_ERROR)
                return
            status = envelope.get("status")
            raw = envelope.get("reply")
            answer: dict[str, Any] = raw if isinstance(raw, dict) else {}
            if status != "ok" or "rc" in answer:
                rc = answer.get("rc") or (RC_TIMEOUT if status == "timeout" else RC_ERROR)
                self._fail(t, answer.get("reason") or f"object {seq} was not answered ({status})", rc,
                           "expire" if rc == RC_TIMEOUT else "fail")
                return
            self.s._record(t.machine_id, "ack", {"seq": seq})
            with self.cond:
                self.replies.setdefault(seq, {})[t.name] = answer.get("reply")
                t.next_seq = seq + 1
                if not answer.get("continue", True):
                    t.done = True
                self.cond.notify_all()
            if self.s.progress is not None:
                self.s.progress(t.name, t.next_seq)
            if t.done:
                self.s._record(t.machine_id, "complete", {"objects": t.next_seq, "reason": "the receiver ended it"})
                return
        # the stream ended (producer done, or process_replies stopped it): tell the receiver
        reason = "stopped by process_replies" if self.stopped else "the producer is done"
        try:
            self.s.deliver(t.name, {"stream_id": self.stream_id, "kind": "end", "reason": reason}, 30.0)
        except Exception as exc:  # noqa: BLE001 - the receiver will expire the stream when idle
            logger.info("stream %s: end not delivered to %s: %s", self.stream_id, t.name, exc)
        with self.cond:
            t.done = True
            self.cond.notify_all()
        self.s._record(t.machine_id, "complete", {"objects": t.next_seq, "reason": reason})


class LocalStreamNetwork:
    """Participants in one process that stream to each other by direct calls (tests, local components)."""

    def __init__(self) -> None:
        self.members: dict[str, ObjectStreamer] = {}

    def join(self, name: str, runtime: Runtime | None = None, **kw: Any) -> ObjectStreamer:
        """A streamer for ``name`` whose deliveries reach the network's other members."""
        def deliver(target: str, message: dict[str, Any], timeout: float) -> dict[str, Any]:
            member = self.members.get(target)
            if member is None:
                return {"status": "refused", "reply": None}
            answer: list[dict[str, Any]] = []

            def call() -> None:
                try:
                    answer.append({"status": "ok", "reply": member.handle(name, message)})
                except Exception as exc:  # noqa: BLE001 - the sender gets an error envelope, as over the wire
                    answer.append({"status": "error", "reply": None, "reason": f"{type(exc).__name__}: {exc}"})

            worker = threading.Thread(target=call, daemon=True)
            worker.start()
            worker.join(timeout)
            return answer[0] if answer else {"status": "timeout", "reply": None}

        streamer = self.members[name] = ObjectStreamer(name, deliver, runtime, **kw)
        return streamer
