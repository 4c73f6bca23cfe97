"""Routes every fedlog server has: health, who-am-I and the OpenAPI document.

``create_app(store)`` is the app ``fedlog`` serves when nothing else is mounted;
the job and task routes of the full server are added to the same router.
"""

from __future__ import annotations

import engine
from engine.server.auth import ANY_ROLE, AuditHook, CredentialStore
from engine.server.http import App, Limits, Request, Response, json_response
from engine.server.openapi import openapi_route
from engine.server.routing import Route, Router

__all__ = ["base_router", "create_app"]

VERSION = engine.__version__

HEALTH_SCHEMA = {
    "type": "object", "required": ["status", "version"], "additionalProperties": False,
    "properties": {"status": {"const": "ok"}, "version": {"type": "string"}},
}
WHOAMI_SCHEMA = {
    "type": "object", "required": ["name", "role"], "additionalProperties": False,
    "properties": {"name": {"type": "string"}, "role": {"enum": ["site", "admin"]}},
}


async def health(request: Request) -> Response:
    """Answer that the server is up (public: load balancers and start-up probes call it)."""
    return json_response({"status": "ok", "version": request.app.version})


async def whoami(request: Request) -> Response:
    """Tell the caller which identity its token stands for."""
    assert request.identity is not None  # the route requires a credential
    return json_response({"name": request.identity.name, "role": request.identity.role})


def base_router() -> Router:
    """A router holding the routes every server has."""
    return Router([
        Route("GET", "/v1/health", health, "Is the server up?", roles=None,
              response_schema=HEALTH_SCHEMA, tags=("meta",)),
        Route("GET", "/v1/whoami", whoami, "The identity the caller's token stands for",
              roles=ANY_ROLE, response_schema=WHOAMI_SCHEMA, tags=("meta",)),
        openapi_route(),
    ])


def create_app(store: CredentialStore, *, limits: Limits | None = None,
               audit: AuditHook | None = None) -> App:
    """The base app: only the routes of ``base_router``."""
    return App(base_router(), authenticator=store, limits=limits, audit=audit,
               title="fedlog", version=VERSION)
