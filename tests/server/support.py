"""A sample app on the real HTTP layer, a provisioned federation, and transports to it.

The sample app has one route per behaviour the protocol tests check (JSON with a
schema, octet uploads and downloads, admin-only, per-site access, a failing
handler, literal-vs-placeholder routing, typed query parameters, a mapped engine
error). ``SampleState`` counts handler calls, so a test can prove a rejected
request reached no handler. It is also the ``--app`` of the end-to-end server
process (``tests.server.support:create_app``).

``connect`` fixtures give the same test a transport either in-process
(``AsgiTransport``) or over a real loopback socket to uvicorn (``HttpTransport``).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from engine.client.transport import AsgiTransport, HttpTransport, Transport
from engine.errors import UnknownMachine
from engine.provision import load_identity, provision
from engine.server.auth import ADMIN_ONLY, ANY_ROLE, AuditEvent, CredentialStore
from engine.server.base import base_router
from engine.server.http import (
    App,
    HttpError,
    Limits,
    Request,
    Response,
    bytes_response,
    json_response,
)
from engine.server.routing import QueryParam, Route
from engine.server.serve import ServerThread

SITES = ("site-1", "site-2")

SMALL_LIMITS = Limits(max_json_bytes=2048, max_octet_bytes=8192, max_header_count=40,
                      max_header_bytes=4096)

ECHO_SCHEMA = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 4000},
        "rounds": {"type": "integer", "minimum": 1, "maximum": 100},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
    },
}
ECHO_RESPONSE = {
    "type": "object", "required": ["you", "got"],
    "properties": {"you": {"type": "string"}, "got": {"type": "object"}},
}


@dataclass
class SampleState:
    """What the sample app's handlers did."""

    handled: Counter[str] = field(default_factory=Counter)
    blobs: dict[str, bytes] = field(default_factory=dict)
    audit: list[AuditEvent] = field(default_factory=list)
    streamed: list[int] = field(default_factory=list)


def build_sample(store: CredentialStore, limits: Limits | None = None) -> tuple[App, SampleState]:
    """The sample app and the state its handlers write."""
    state = SampleState()

    async def echo(request: Request) -> Response:
        state.handled["echo"] += 1
        assert request.identity is not None
        return json_response({"you": request.identity.name, "got": await request.json()})

    async def put_blob(request: Request) -> Response:
        data = await request.body()
        state.handled["put_blob"] += 1
        name = request.path_params["name"]
        state.blobs[name] = data
        return json_response({"name": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()},
                             status=201)

    async def stream_blob(request: Request) -> Response:
        sizes: list[int] = []
        async for chunk in request.stream():
            sizes.append(len(chunk))
        state.handled["stream_blob"] += 1
        state.streamed.extend(sizes)
        return json_response({"size": sum(sizes), "pieces": len(sizes)})

    async def get_blob(request: Request) -> Response:
        state.handled["get_blob"] += 1
        name = request.path_params["name"]
        if name not in state.blobs:
            raise HttpError(404, "no_such_blob", f"no blob {name!r}", details={"name": name})
        return bytes_response(state.blobs[name])

    async def admin_stats(request: Request) -> Response:
        state.handled["admin_stats"] += 1
        return json_response({"handled": dict(state.handled)})

    async def inbox(request: Request) -> Response:
        site = request.path_params["site"]
        request.require_identity(site)
        state.handled["inbox"] += 1
        return json_response({"site": site})

    async def boom(request: Request) -> Response:
        state.handled["boom"] += 1
        raise RuntimeError("secret internal detail: password=hunter2")

    async def item(request: Request) -> Response:
        return json_response({"item": request.path_params["item_id"]})

    async def special(request: Request) -> Response:
        return json_response({"special": True})

    async def poll(request: Request) -> Response:
        return json_response(request.params)

    async def fire(request: Request) -> Response:
        raise UnknownMachine(request.path_params["machine_id"])

    router = base_router()
    for route in (
        Route("POST", "/v1/echo", echo, "Echo a JSON document", roles=ANY_ROLE, body="json",
              request_schema=ECHO_SCHEMA, response_schema=ECHO_RESPONSE),
        Route("PUT", "/v1/blobs/{name}", put_blob, "Store a blob", roles=ANY_ROLE, body="octet",
              status=201),
        Route("POST", "/v1/blobs/{name}/stream", stream_blob, "Stream a blob", roles=ANY_ROLE,
              body="octet"),
        Route("GET", "/v1/blobs/{name}", get_blob, "Fetch a blob", roles=ANY_ROLE,
              response_type="application/octet-stream", errors=(404,)),
        Route("GET", "/v1/admin/stats", admin_stats, "Handler counts", roles=ADMIN_ONLY),
        Route("GET", "/v1/sites/{site}/inbox", inbox, "A site's own inbox", roles=ANY_ROLE),
        Route("GET", "/v1/boom", boom, "Always fails", roles=ANY_ROLE),
        Route("GET", "/v1/items/{item_id}", item, "An item", roles=None),
        Route("GET", "/v1/items/special", special, "The special item", roles=None),
        Route("GET", "/v1/poll", poll, "Typed query parameters", roles=ANY_ROLE, query=(
            QueryParam("wait", "integer", default=0, minimum=0, maximum=60),
            QueryParam("verbose", "boolean", default=False),
            QueryParam("site", "string", required=True),
        )),
        Route("POST", "/v1/machines/{machine_id}/fire", fire, "Fire a trigger", roles=ADMIN_ONLY,
              errors=(404,)),
    ):
        router.add(route)
    app = App(router, authenticator=store, limits=limits or SMALL_LIMITS, audit=state.audit.append,
              title="sample", version="1", check_responses=True)
    return app, state


def create_app(store: CredentialStore, limits: Limits | None = None) -> App:
    """Factory for ``python -m engine.server.serve --app tests.server.support:create_app``."""
    return build_sample(store, limits=SMALL_LIMITS)[0]


@dataclass
class Federation:
    """A provisioned folder and the tokens in it."""

    root: Path
    store: CredentialStore
    tokens: dict[str, str]


def make_federation(root: Path, sites: tuple[str, ...] = SITES) -> Federation:
    """Provision ``sites`` (and the admin) under ``root``."""
    provision(root, sites)
    tokens = {name: load_identity(root / name).token for name in (*sites, "admin")}
    return Federation(root, CredentialStore.load(root / "server"), tokens)


Connect = Callable[[str | None], Transport]


@pytest.fixture
def federation(tmp_path: Path) -> Federation:
    """site-1, site-2 and the admin, freshly provisioned."""
    return make_federation(tmp_path / "fed")


@pytest.fixture
def sample(federation: Federation) -> tuple[App, SampleState]:
    """The sample app (small limits) and its state."""
    return build_sample(federation.store)


@pytest.fixture(params=["asgi", "http"])
def connect(request: pytest.FixtureRequest, sample: tuple[App, SampleState],
            federation: Federation) -> Iterator[Connect]:
    """``connect(name)`` -> a transport as that identity (None: no token; other text: that token).

    Parametrized: in-process ``AsgiTransport``, then ``HttpTransport`` to uvicorn on loopback.
    """
    app, _ = sample
    opened: list[Any] = []

    def token_for(who: str | None) -> str | None:
        return federation.tokens.get(who, who) if who is not None else None

    if request.param == "asgi":
        base = AsgiTransport(app, None)
        opened.append(base)

        def make(who: str | None) -> Transport:
            return base.with_token(token_for(who))

        yield make
    else:
        server = ServerThread(app).start()

        def make(who: str | None) -> Transport:
            transport = HttpTransport(server.url, token_for(who))
            opened.append(transport)
            return transport

        try:
            yield make
        finally:
            for transport in opened:
                transport.close()
            server.stop()
        return
    for transport in opened:
        transport.close()
