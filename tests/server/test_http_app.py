"""The ASGI app driven directly: what no well-behaved client transport would send."""

from __future__ import annotations

import asyncio
import http.client
import os
from typing import Any

import orjson
import pytest

from engine.client.transport import AsgiTransport
from engine.errors import ConfigError
from engine.server.auth import ANY_ROLE
from engine.server.http import App, Request, Response, json_response
from engine.server.routing import QueryParam, Route, Router
from engine.server.serve import ServerThread
from tests.server.support import SMALL_LIMITS, Federation, SampleState


class Exchange:
    """One request fed to the app message by message; the messages it sent back."""

    def __init__(self, app: App, method: str, path: str, headers: list[tuple[bytes, bytes]],
                 body: list[bytes | None]) -> None:
        self.app = app
        self.scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(),
                      "query_string": b"", "headers": headers, "client": ("10.0.0.9", 5555)}
        # None in the body list means "the client disconnects here"
        self.body = list(body)
        self.sent: list[dict[str, Any]] = []
        self.received = 0

    async def receive(self) -> dict[str, Any]:
        self.received += 1
        if not self.body:
            return {"type": "http.disconnect"}
        chunk = self.body.pop(0)
        if chunk is None:
            self.body = []
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": chunk, "more_body": bool(self.body)}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    def run(self) -> Exchange:
        asyncio.run(self.app(self.scope, self.receive, self.send))
        return self

    @property
    def status(self) -> int:
        return int(self.sent[0]["status"])

    @property
    def error(self) -> dict[str, Any]:
        return orjson.loads(self.sent[1]["body"])["error"]  # type: ignore[no-any-return]


def auth(federation: Federation, who: str = "site-1") -> list[tuple[bytes, bytes]]:
    return [(b"authorization", f"Bearer {federation.tokens[who]}".encode())]


OCTET = [(b"content-type", b"application/octet-stream")]


def test_chunked_body_over_the_limit_is_413_mid_stream(sample: tuple[App, SampleState],
                                                       federation: Federation) -> None:
    app, state = sample
    pieces: list[bytes | None] = [b"a" * 3000] * 3  # 9000 > 8192, no Content-Length
    ex = Exchange(app, "PUT", "/v1/blobs/x", auth(federation) + OCTET, pieces).run()
    assert ex.status == 413
    assert ex.error["code"] == "payload_too_large"
    assert not state.handled and not state.blobs


def test_declared_length_over_the_limit_reads_nothing(sample: tuple[App, SampleState],
                                                      federation: Federation) -> None:
    app, state = sample
    headers = auth(federation) + OCTET + [(b"content-length", b"8193")]
    ex = Exchange(app, "PUT", "/v1/blobs/x", headers, [b"a" * 8193]).run()
    assert ex.status == 413
    assert ex.received == 0
    assert not state.handled


def test_bad_content_length_is_400(sample: tuple[App, SampleState], federation: Federation) -> None:
    headers = auth(federation) + OCTET + [(b"content-length", b"ten")]
    ex = Exchange(sample[0], "PUT", "/v1/blobs/x", headers, [b"x"]).run()
    assert ex.status == 400
    assert ex.error["code"] == "bad_request"


def test_client_gone_mid_body_gets_no_answer_and_changes_nothing(
        sample: tuple[App, SampleState], federation: Federation) -> None:
    app, state = sample
    ex = Exchange(app, "PUT", "/v1/blobs/x", auth(federation) + OCTET, [b"a" * 100, None]).run()
    assert ex.sent == []
    assert not state.handled and not state.blobs


def test_audit_records_the_client_address(sample: tuple[App, SampleState]) -> None:
    app, state = sample
    Exchange(app, "GET", "/v1/whoami", [(b"authorization", b"Bearer nope")], []).run()
    assert state.audit[0].client == "10.0.0.9:5555"
    assert state.audit[0].reason == "the token is not valid for this server"


def test_response_outside_its_schema_is_a_500(federation: Federation) -> None:
    async def liar(request: Request) -> Response:
        return json_response({"count": "three"})

    router = Router([Route("GET", "/x", liar, "lies", roles=None,
                           response_schema={"type": "object", "properties": {"count": {"type": "integer"}}})])
    strict = Exchange(App(router, check_responses=True), "GET", "/x", [], []).run()
    assert strict.status == 500
    lenient = Exchange(App(router), "GET", "/x", [], []).run()
    assert lenient.status == 200


def test_routes_needing_roles_need_an_authenticator() -> None:
    async def handler(request: Request) -> Response:
        return json_response({})

    with pytest.raises(ConfigError, match="authenticator"):
        App(Router([Route("GET", "/x", handler, "x", roles=ANY_ROLE)]))


def test_lifespan_hooks_run_and_failures_are_reported() -> None:
    calls: list[str] = []

    async def start() -> None:
        calls.append("start")

    async def stop() -> None:
        calls.append("stop")

    async def broken() -> None:
        raise OSError("database unreachable")

    app = App(Router(), on_startup=[start], on_shutdown=[stop])
    AsgiTransport(app, None).close()
    assert calls == ["start", "stop"]
    with pytest.raises(ConfigError, match="database unreachable"):
        AsgiTransport(App(Router(), on_startup=[broken]), None)


def test_failed_startup_stops_the_server_thread() -> None:
    async def broken() -> None:
        raise OSError("database unreachable")

    with pytest.raises(ConfigError, match="failed to start"):
        ServerThread(App(Router(), on_startup=[broken])).start()


def test_chunked_upload_through_uvicorn(sample: tuple[App, SampleState], federation: Federation) -> None:
    app, state = sample
    with ServerThread(app) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        headers = {"Authorization": f"Bearer {federation.tokens['site-1']}",
                   "Content-Type": "application/octet-stream"}
        ok = [os.urandom(1000) for _ in range(8)]
        conn.request("PUT", "/v1/blobs/c", body=iter(ok), headers=headers, encode_chunked=True)
        resp = conn.getresponse()
        assert (resp.status, orjson.loads(resp.read())["size"]) == (201, 8000)
        too_big = [os.urandom(1000) for _ in range(SMALL_LIMITS.max_octet_bytes // 1000 + 1)]
        conn.request("PUT", "/v1/blobs/d", body=iter(too_big), headers=headers, encode_chunked=True)
        resp = conn.getresponse()
        assert resp.status == 413
        assert orjson.loads(resp.read())["error"]["code"] == "payload_too_large"
        conn.close()
    assert state.blobs == {"c": b"".join(ok)}



def test_handler_returning_a_non_response_is_a_json_500(caplog: pytest.LogCaptureFixture) -> None:
    async def sloppy(request: Request) -> Response:
        return {"oops": True}  # type: ignore[return-value]

    ex = Exchange(App(Router([Route("GET", "/x", sloppy, "x", roles=None)])), "GET", "/x", [], []).run()
    assert ex.status == 500 and ex.error["code"] == "internal_error"
    assert "returned dict, not a Response" in caplog.text


def test_raw_query_text_is_kept_beside_typed_params(federation: Federation) -> None:
    seen: dict[str, object] = {}

    async def look(request: Request) -> Response:
        seen.update(query=request.query, params=request.params)
        return json_response({})

    app = App(Router([Route("GET", "/x", look, "x", roles=None, query=(QueryParam("n", "integer"),))]))
    ex = Exchange(app, "GET", "/x", [], [])
    ex.scope["query_string"] = b"n=%2B7"
    ex.run()
    assert ex.status == 200
    assert seen == {"query": {"n": "+7"}, "params": {"n": 7}}
