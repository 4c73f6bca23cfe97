"""The reference streaming API: producers, consumers, per-target progress, recorded sessions."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from engine.charts.registry import ChartRegistry
from engine.clock import ManualClock
from engine.errors import ConfigError
from engine.log.memory import MemoryRecorder
from engine.machines.runtime import Runtime
from engine.streams import (
    ConsumerFactory,
    LocalStreamNetwork,
    ObjectConsumer,
    ObjectProducer,
    StreamContext,
    StreamContextKey,
)


class Counter(ObjectProducer):
    """Produces ``n`` numbered objects; collects every reply; optionally stops at a reply value."""

    def __init__(self, n: int, timeout: float = 5.0, stop_at: int | None = None) -> None:
        self.n = n
        self.i = 0
        self.timeout = timeout
        self.stop_at = stop_at
        self.replies: list[dict[str, Any]] = []

    def produce(self, stream_ctx: StreamContext) -> tuple[Any, float]:
        if self.i >= self.n:
            return None, self.timeout
        self.i += 1
        return {"i": self.i - 1}, self.timeout

    def process_replies(self, replies: dict[str, Any], stream_ctx: StreamContext) -> Any:
        self.replies.append(replies)
        if self.stop_at is not None and len(self.replies) == self.stop_at:
            return {"stopped_after": len(self.replies)}
        return None


class Collect(ObjectConsumer):
    def __init__(self, sink: list[Any], gate: threading.Event | None = None, fail_at: int | None = None) -> None:
        self.sink = sink
        self.gate = gate
        self.fail_at = fail_at
        self.finalized = 0

    def consume(self, obj: Any, stream_ctx: StreamContext) -> tuple[bool, Any]:
        if self.gate is not None:
            self.gate.wait()
        if self.fail_at is not None and obj["i"] == self.fail_at:
            raise ValueError("cannot take this one")
        self.sink.append(obj["i"])
        return True, obj["i"] * 10

    def finalize(self, stream_ctx: StreamContext) -> None:
        self.finalized += 1


class Factory(ConsumerFactory):
    def __init__(self, **kw: Any) -> None:
        self.kw = kw
        self.sink: list[Any] = []
        self.consumers: list[Collect] = []
        self.returned = 0

    def get_consumer(self, stream_ctx: StreamContext) -> ObjectConsumer:
        consumer = Collect(self.sink, **self.kw)
        self.consumers.append(consumer)
        return consumer

    def return_consumer(self, consumer: ObjectConsumer, stream_ctx: StreamContext) -> None:
        self.returned += 1


def runtime_for(charts: ChartRegistry, clock: ManualClock) -> Runtime:
    return Runtime(MemoryRecorder(), charts, clock=clock, run_timers=False)


def triggers(runtime: Runtime, machine_id: str) -> list[str]:
    return [e.trigger for e in runtime.recorder.read(machine_id=machine_id)]


def test_objects_reach_every_target_in_order_and_both_sides_record_the_session(
        charts: ChartRegistry, clock: ManualClock) -> None:
    net = LocalStreamNetwork()
    sender_rt = runtime_for(charts, clock)
    sender = net.join("server", sender_rt)
    factories, runtimes = {}, {}
    done: list[tuple[str, str]] = []
    for site in ("a", "b"):
        runtimes[site] = runtime_for(charts, clock)
        factories[site] = Factory()
        net.join(site, runtimes[site]).register_stream_processing(
            "ch", "model", factories[site], stream_done_cb=lambda ctx, who: done.append((who, ctx[StreamContextKey.RC])),
            who=site)
    producer = Counter(5)
    assert sender.stream_objects("ch", "model", {"round": 3}, ["a", "b"], producer) is None
    for site in ("a", "b"):
        assert factories[site].sink == [0, 1, 2, 3, 4]
        assert factories[site].consumers[0].finalized == 1 and factories[site].returned == 1
    assert [sorted(r) for r in producer.replies] == [["a", "b"]] * 5
    assert [r["a"] for r in producer.replies] == [0, 10, 20, 30, 40]
    assert sorted(done) == [("a", "OK"), ("b", "OK")]
    sends = [m.machine_id for m in sender_rt.recorder.machines() if m.kind == "stream_send"]
    assert len(sends) == 2
    for machine_id in sends:
        assert triggers(sender_rt, machine_id) == ["create", "offer", "want", "start"] + ["ack"] * 5 + ["complete"]
    receives = [m for m in runtimes["a"].recorder.machines() if m.kind == "stream_receive"]
    assert len(receives) == 1 and receives[0].state == "completed"
    assert triggers(runtimes["a"], receives[0].machine_id).count("ack") == 5


def test_process_replies_can_end_the_stream_with_a_result(charts: ChartRegistry, clock: ManualClock) -> None:
    net = LocalStreamNetwork()
    sender = net.join("s")
    factory = Factory()
    net.join("a").register_stream_processing("ch", "t", factory)
    result = sender.stream_objects("ch", "t", {}, ["a"], Counter(100, stop_at=3))
    assert result == {"stopped_after": 3}
    assert len(factory.sink) < 100 and factory.consumers[0].finalized == 1


def test_a_dead_receiver_is_dropped_after_its_entry_timeout_and_the_others_finish(
        charts: ChartRegistry, clock: ManualClock) -> None:
    net = LocalStreamNetwork()
    sender_rt = runtime_for(charts, clock)
    sender = net.join("s", sender_rt)
    live, dead = Factory(), Factory(gate=threading.Event())  # the dead one never returns from consume
    net.join("live").register_stream_processing("ch", "t", live)
    net.join("dead").register_stream_processing("ch", "t", dead)
    producer = Counter(20, timeout=0.3)
    sender.stream_objects("ch", "t", {}, ["live", "dead"], producer)
    assert live.sink == list(range(20))
    assert dead.sink == []
    assert producer.replies[0]["dead"]["rc"] == "TIMEOUT"
    # every object's replies: the live one's answer, and for the dead one (while it was in the stream) its error
    assert [r["live"] for r in producer.replies] == [i * 10 for i in range(20)]
    assert all(r["dead"]["rc"] == "TIMEOUT" for r in producer.replies if "dead" in r)
    states = {m.machine_id.rsplit(":", 1)[1]: m.state for m in sender_rt.recorder.machines() if m.kind == "stream_send"}
    assert states == {"live": "completed", "dead": "failed"}
    dead.kw["gate"].set()


def test_a_slow_receiver_does_not_pace_the_fast_one(charts: ChartRegistry, clock: ManualClock) -> None:
    net = LocalStreamNetwork()
    sender = net.join("s", window=64)
    gate = threading.Event()
    fast, slow = Factory(), Factory(gate=gate)
    net.join("fast").register_stream_processing("ch", "t", fast)
    net.join("slow").register_stream_processing("ch", "t", slow)
    finished_fast = threading.Event()

    def progress(target: str, answered: int) -> None:
        if target == "fast" and answered == 30:
            finished_fast.set()
            gate.set()  # the slow one may go on only once the fast one has every object

    sender.progress = progress
    sender.stream_objects("ch", "t", {}, ["fast", "slow"], Counter(30, timeout=30))
    assert finished_fast.is_set()
    assert fast.sink == slow.sink == list(range(30))


def test_a_consumer_error_fails_that_target_only(charts: ChartRegistry, clock: ManualClock) -> None:
    net = LocalStreamNetwork()
    sender = net.join("s")
    good, bad = Factory(), Factory(fail_at=2)
    net.join("good").register_stream_processing("ch", "t", good)
    net.join("bad").register_stream_processing("ch", "t", bad)
    producer = Counter(5)
    sender.stream_objects("ch", "t", {}, ["good", "bad"], producer)
    assert good.sink == [0, 1, 2, 3, 4] and bad.sink == [0, 1]
    assert producer.replies[2]["bad"]["rc"] == "EXECUTION_EXCEPTION"
    assert "cannot take this one" in producer.replies[2]["bad"]["reason"]
    assert bad.consumers[0].finalized == 1


def test_no_consumer_and_bad_arguments_are_precise(charts: ChartRegistry, clock: ManualClock) -> None:
    net = LocalStreamNetwork()
    sender = net.join("s")
    net.join("a")
    producer = Counter(3)
    sender.stream_objects("ch", "nobody", {}, ["a"], producer)
    assert producer.replies[0]["a"]["rc"] == "NO_CONSUMER"
    with pytest.raises(ConfigError, match="non-empty list"):
        sender.stream_objects("ch", "t", {}, [], Counter(1))
    with pytest.raises(ConfigError, match="secure=True"):
        sender.stream_objects("ch", "t", {}, ["a"], Counter(1), secure=True)
    receiver = net.members["a"]
    receiver.register_stream_processing("ch", "t", Factory())
    with pytest.raises(ConfigError, match="already have a consumer factory"):
        receiver.register_stream_processing("ch", "t", Factory())


def test_a_repeated_object_is_answered_without_consuming_it_again_and_gaps_are_refused(
        charts: ChartRegistry, clock: ManualClock) -> None:
    net = LocalStreamNetwork()
    factory = Factory()
    receiver = net.join("a")
    receiver.register_stream_processing("ch", "t", factory)
    first = {"stream_id": "x", "channel": "ch", "topic": "t", "seq": 0, "kind": "data", "obj": {"i": 7}, "ctx": {}}
    assert receiver.handle("s", first) == {"continue": True, "reply": 70}
    again = receiver.handle("s", first)
    assert again["reply"] == 70 and again["repeated"] and factory.sink == [7]
    gap = receiver.handle("s", {**first, "seq": 5})
    assert gap["rc"] == "BAD_REQUEST" and "expected 1" in gap["reason"]
    assert receiver.handle("s", {"stream_id": "x", "kind": "end"}) == {"continue": False, "reply": None}
    assert factory.consumers[0].finalized == 1


def test_an_idle_inbound_stream_is_finalized_and_shutdown_aborts_the_rest(
        charts: ChartRegistry, clock: ManualClock) -> None:
    net = LocalStreamNetwork()
    rt = runtime_for(charts, clock)
    factory = Factory()
    receiver = net.join("a", rt, idle_timeout=0.0)
    receiver.register_stream_processing("ch", "t", factory)
    msg = {"channel": "ch", "topic": "t", "seq": 0, "kind": "data", "obj": {"i": 1}, "ctx": {}}
    receiver.handle("s", {**msg, "stream_id": "one"})
    receiver.idle_timeout = 3600.0
    assert receiver.expire_idle() == 0
    receiver.idle_timeout = 0.0
    assert receiver.expire_idle() == 1
    receiver.idle_timeout = 3600.0
    receiver.handle("s", {**msg, "stream_id": "two"})
    receiver.shutdown_streamer()
    states = {m.machine_id: m.state for m in rt.recorder.machines() if m.kind == "stream_receive"}
    assert states == {"sr:one:a": "failed", "sr:two:a": "aborted"}
    assert [c.finalized for c in factory.consumers] == [1, 1]
