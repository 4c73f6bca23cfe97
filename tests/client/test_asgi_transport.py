"""AsgiTransport: the in-process seam behaves like the socket transport."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest

from engine.client.errors import RemoteError, TransportError
from engine.client.transport import AsgiTransport
from engine.server.http import App, Request, Response, json_response
from engine.server.routing import Route, Router
from tests.server.support import Federation, SampleState


def test_body_arrives_in_pieces(sample: tuple[App, SampleState], federation: Federation) -> None:
    app, state = sample
    with AsgiTransport(app, federation.tokens["site-1"], chunk_size=1000) as client:
        data = os.urandom(4500)
        assert client.request("POST", "/v1/blobs/p/stream", body=data).json() == {"size": 4500, "pieces": 5}
    assert state.streamed == [1000, 1000, 1000, 1000, 500]


def test_twins_share_the_app_and_loop(sample: tuple[App, SampleState], federation: Federation) -> None:
    base = AsgiTransport(sample[0], None)
    site = base.with_token(federation.tokens["site-2"])
    assert site.request("GET", "/v1/whoami").json()["name"] == "site-2"
    site.close()  # a twin's close leaves the shared loop running
    assert base.request("GET", "/v1/health").status == 200
    base.close()


def test_slow_app_times_out() -> None:
    release = asyncio.Event()

    async def hang(request: Request) -> Response:
        await release.wait()
        return json_response({})

    with AsgiTransport(App(Router([Route("GET", "/hang", hang, "hang", roles=None)])), None) as client, \
            pytest.raises(TransportError) as err:
        client.request("GET", "/hang", timeout=0.1)
    assert err.value.maybe_processed and "timed out" in err.value.reason


def test_raw_app_failure_looks_like_uvicorns_500() -> None:
    async def broken(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            raise RuntimeError("bug")

    with AsgiTransport(broken, None, lifespan=False) as client, pytest.raises(RemoteError) as err:
        client.request("GET", "/x")
    assert (err.value.status, err.value.code, err.value.message) == (500, "http_500", "Internal Server Error")


def test_closing_cancels_requests_in_flight_and_their_callers_are_told() -> None:
    import threading

    cancelled = threading.Event()
    entered = threading.Event()

    async def long_poll(request: Request) -> Response:
        entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()  # the app's task ran to its end: nothing is left pending in the closed loop
            raise
        return json_response({})  # pragma: no cover

    client = AsgiTransport(App(Router([Route("GET", "/poll", long_poll, "poll", roles=None)])), None)
    errors: list[BaseException] = []

    def poll() -> None:
        try:
            client.request("GET", "/poll", timeout=60)
        except BaseException as exc:  # noqa: BLE001 - checked below
            errors.append(exc)

    caller = threading.Thread(target=poll)
    caller.start()
    assert entered.wait(10)
    client.close()
    caller.join(10)
    assert not caller.is_alive()  # told at once, not after its 60 s
    assert cancelled.is_set()
    assert len(errors) == 1 and isinstance(errors[0], TransportError) and "closed" in errors[0].reason
