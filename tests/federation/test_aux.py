"""Aux messages: site to site (relayed), site to server, timeouts, refusals, and the record of each."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.charts.loader import load_charts
from engine.client.api import AdminApi, SiteApi
from engine.client.engine import SiteEngine
from engine.client.transport import AsgiTransport
from engine.clock import SystemClock
from engine.errors import AuthError, ConfigError, RemoteError, TaskError
from engine.log.memory import MemoryRecorder
from engine.machines.runtime import Runtime
from engine.server.service import FedServer
from engine.streams import (
    ConsumerFactory,
    ObjectConsumer,
    ObjectProducer,
    StreamContext,
    StreamContextKey,
)
from tests.federation.support import EXECUTOR, Federation, make_federation, wait_until

MODEL = {"w": [0.0, 1.0], "b": 0.5}


@pytest.fixture
def fed(tmp_path: Path) -> Federation:
    return make_federation(tmp_path)


@pytest.fixture
def server(tmp_path: Path, fed: Federation) -> FedServer:
    return FedServer(tmp_path / "server.db", fed.server_dir)


@pytest.fixture
def base(server: FedServer, fed: Federation) -> Iterator[AsgiTransport]:
    with AsgiTransport(server.app, fed.token("admin")) as transport:
        yield transport


@pytest.fixture
def job(base: AsgiTransport, fed: Federation) -> str:
    """A running job of site-1 and site-2 (site-3 is provisioned but not in it)."""
    for site in ("site-1", "site-2"):
        SiteApi(base.with_token(fed.token(site)), site).heartbeat()
    admin = AdminApi(base)
    job_id = str(admin.submit_job({"workflow": "fedavg", "executor": EXECUTOR, "min_sites": 2,
                                   "args": {"model": MODEL, "rounds": 1}})["job_id"])
    wait_until(lambda: admin.show_job(job_id)["current_task"])
    assert admin.show_job(job_id)["sites"] == ["site-1", "site-2"]
    return job_id


@pytest.fixture
def engines(base: AsgiTransport, fed: Federation, job: str) -> Iterator[dict[str, SiteEngine]]:
    made = {s: SiteEngine(base.with_token(fed.token(s)), s, job_id=job, job_sites=["site-1", "site-2"],
                          poll_wait=0.2)
            for s in ("site-1", "site-2", "site-3")}
    yield made
    for engine in made.values():
        engine.close()


def aux_rows(server: FedServer) -> dict[str, str]:
    return {row.machine_id.split("/")[-1]: row.state for row in server.recorder.machines(kind="aux")}


def test_a_site_asks_another_site_of_its_job(server: FedServer, engines: dict[str, SiteEngine]) -> None:
    seen: list[tuple[str, Any, str]] = []

    def ping(topic: str, request: Any, sender: str) -> Any:
        seen.append((topic, request, sender))
        return {"pong": request["n"] + 1}

    engines["site-2"].register_aux_message_handler("ping", ping)
    engines["site-2"].start()
    replies = engines["site-1"].send_aux_request(["site-2"], "ping", {"n": 41}, timeout=10)
    assert replies == {"site-2": {"status": "ok", "reply": {"pong": 42}}}
    assert seen == [("ping", {"n": 41}, "site-1")]
    (row,) = server.recorder.machines(kind="aux")
    assert row.state == "replied" and row.site == "site-2"
    assert [e.trigger for e in server.recorder.read(machine_id=row.machine_id)] == ["create", "deliver", "reply"]


def test_requests_to_the_server(server: FedServer, engines: dict[str, SiteEngine]) -> None:
    server.aux.register_handler("echo", lambda topic, request, sender: {"from": sender, "echo": request})
    replies = engines["site-1"].send_aux_request(["server"], "echo", [1, 2], timeout=5)
    assert replies == {"server": {"status": "ok", "reply": {"from": "site-1", "echo": [1, 2]}}}
    assert engines["site-1"].send_aux_request(["server"], "nobody", None, timeout=5) == {
        "server": {"status": "no_handler", "reply": None}}
    assert [row.state for row in server.recorder.machines(kind="aux")] == ["replied", "replied"]


def test_a_silent_target_times_out_and_is_recorded(server: FedServer, engines: dict[str, SiteEngine]) -> None:
    replies = engines["site-1"].send_aux_request(["site-2"], "ping", {}, timeout=0.2)
    assert replies == {"site-2": {"status": "timeout", "reply": None}}
    assert aux_rows(server) == {"site-2": "timed_out"}
    # a reply after the timeout is refused and changes nothing
    (row,) = server.recorder.machines(kind="aux")
    with pytest.raises(RemoteError) as err:
        engines["site-2"].transport.request("POST", "/v1/sites/site-2/aux/replies",
                                            json={"machine_id": row.machine_id, "status": "ok", "reply": 1})
    assert err.value.status == 409


def test_aux_messages_stay_within_the_job(server: FedServer, engines: dict[str, SiteEngine]) -> None:
    replies = engines["site-1"].send_aux_request(["site-3"], "ping", {}, timeout=5)
    assert replies["site-3"]["status"] == "refused" and "not a site of job" in replies["site-3"]["reason"]
    assert aux_rows(server) == {"site-3": "refused"}
    with pytest.raises(AuthError) as err:  # site-3 is not in the job: it cannot send at all
        engines["site-3"].send_aux_request(["site-1"], "ping", {}, timeout=5)
    assert err.value.status == 403 and "not a site of running job" in str(err.value)


def test_only_the_addressed_site_takes_or_answers_a_request(server: FedServer, engines: dict[str, SiteEngine],
                                                            base: AsgiTransport, fed: Federation) -> None:
    sent = threading.Thread(target=engines["site-1"].send_aux_request, args=(["site-2"], "ping", {}, 5))
    sent.start()
    wait_until(lambda: aux_rows(server))
    thief = base.with_token(fed.token("site-1"))
    with pytest.raises(AuthError):
        thief.request("POST", "/v1/sites/site-2/aux/poll", query={"wait": 0})
    (row,) = server.recorder.machines(kind="aux")
    with pytest.raises(RemoteError) as err:
        thief.request("POST", "/v1/sites/site-1/aux/replies", json={"machine_id": row.machine_id, "status": "ok"})
    assert err.value.status == 404
    engines["site-2"].serve_once()  # no handler registered: the sender hears so
    sent.join(10)
    assert aux_rows(server) == {"site-2": "replied"}


def test_fire_and_forget_and_multicast(server: FedServer, engines: dict[str, SiteEngine]) -> None:
    got: list[Any] = []
    engines["site-2"].register_aux_message_handler("note", lambda t, r, s: got.append(r))
    engines["site-2"].register_aux_message_handler("double", lambda t, r, s: r * 2)
    assert engines["site-1"].fire_and_forget_aux_request(["site-2"], "note", "hello") == {
        "site-2": {"status": "sent", "reply": None}}
    assert engines["site-2"].serve_once() == 1 and got == ["hello"]
    assert aux_rows(server) == {"site-2": "closed"}
    engines["site-2"].start()
    out = engines["site-1"].multicast_aux_requests("double", {"site-2": 21, "server": 1}, timeout=5)
    assert out == {"site-2": {"status": "ok", "reply": 42}, "server": {"status": "no_handler", "reply": None}}


def test_handler_registration_errors(engines: dict[str, SiteEngine]) -> None:
    engine = engines["site-1"]
    engine.register_aux_message_handler("ping", lambda t, r, s: None)
    with pytest.raises(ConfigError, match="already has a handler"):
        engine.register_aux_message_handler("ping", lambda t, r, s: None)
    with pytest.raises(ConfigError, match="non-empty string"):
        engine.register_aux_message_handler("", lambda t, r, s: None)
    with pytest.raises(ConfigError, match="must be callable"):
        engine.register_aux_message_handler("pong", "not a function")  # type: ignore[arg-type]
    with pytest.raises(TaskError, match="targets"):
        engine.send_aux_request([], "ping", {})
    assert engine.get_job_clients() == ["site-1", "site-2"]


class _Numbers(ObjectProducer):
    def __init__(self, n: int) -> None:
        self.n, self.i = n, 0
        self.replies: list[dict[str, Any]] = []

    def produce(self, stream_ctx: StreamContext) -> tuple[Any, float]:
        self.i += 1
        return ({"i": self.i - 1}, 10.0) if self.i <= self.n else (None, 10.0)

    def process_replies(self, replies: dict[str, Any], stream_ctx: StreamContext) -> Any:
        self.replies.append(replies)
        return None


class _Sum(ObjectConsumer):
    def __init__(self, totals: list[int]) -> None:
        self.totals = totals
        self.total = 0

    def consume(self, obj: Any, stream_ctx: StreamContext) -> tuple[bool, Any]:
        self.total += obj["i"]
        return True, self.total

    def finalize(self, stream_ctx: StreamContext) -> None:
        self.totals.append(self.total)


class _SumFactory(ConsumerFactory):
    def __init__(self) -> None:
        self.totals: list[int] = []

    def get_consumer(self, stream_ctx: StreamContext) -> ObjectConsumer:
        assert stream_ctx["round"] == 4 and stream_ctx[StreamContextKey.SENDER] == "site-1"
        return _Sum(self.totals)


def test_sites_stream_objects_through_the_relay_and_both_sides_record_it(
        server: FedServer, engines: dict[str, SiteEngine]) -> None:
    runtimes = {s: Runtime(MemoryRecorder(), load_charts(), clock=SystemClock(), run_timers=False) for s in ("site-1", "site-2")}
    for site, runtime in runtimes.items():
        engines[site].runtime = runtime
    factory = _SumFactory()
    done: list[str] = []
    engines["site-2"].register_stream_processing("app", "numbers", factory,
                                                 stream_done_cb=lambda ctx, tag: done.append(tag), tag="ended")
    engines["site-2"].start()
    producer = _Numbers(6)
    assert engines["site-1"].stream_objects("app", "numbers", {"round": 4}, ["site-2"], producer) is None
    assert [r["site-2"] for r in producer.replies] == [0, 1, 3, 6, 10, 15]
    assert factory.totals == [15] and done == ["ended"]
    (send,) = runtimes["site-1"].recorder.machines(kind="stream_send")
    (recv,) = runtimes["site-2"].recorder.machines(kind="stream_receive")
    assert send.state == recv.state == "completed"
    # each object (and the end) was a recorded aux request in the server's log
    assert sum(1 for row in server.recorder.machines(kind="aux")) == 7
    # a site outside the job is refused, and only that target's stream fails
    refused = _Numbers(2)
    engines["site-1"].stream_objects("app", "numbers", {"round": 4}, ["site-3"], refused)
    assert refused.replies[0]["site-3"]["rc"] == "EXECUTION_EXCEPTION"
