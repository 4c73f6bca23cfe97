"""The OpenAPI 3.1 description of an app's routes, built from the route specs.

Nothing is written twice: the schemas, roles, query parameters and error statuses
the HTTP layer enforces are the ones published here. OpenAPI 3.1 uses JSON Schema
as is, so the route schemas go in unchanged. Roles appear as ``x-roles`` (OpenAPI
has no notion of roles) and in each operation's description.
"""

from __future__ import annotations

from typing import Any

from engine.server.http import JSON_TYPE, OCTET_TYPE, Request, Response, json_response
from engine.server.routing import Route, Router

__all__ = ["ERROR_SCHEMA", "openapi_document", "openapi_route"]

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string", "description": "stable machine-readable reason"},
                "message": {"type": "string", "description": "what went wrong, for people"},
            },
            "additionalProperties": True,
        }
    },
}

_REASONS = {
    400: "Malformed request (bad JSON, bad header value)",
    401: "Missing or invalid credential",
    403: "The identity's role may not call this route, or may not act for that site",
    404: "No such route or resource",
    405: "Method not allowed at this path",
    409: "Conflicts with the current state",
    413: "Body larger than the limit",
    415: "Wrong Content-Type",
    422: "Invalid fields or query parameters",
    431: "Too many or too large request headers",
    500: "Unexpected server failure (details are in the server log, by incident id)",
}


def openapi_document(router: Router, *, title: str, version: str) -> dict[str, Any]:
    """Build the OpenAPI 3.1 document for every published route of ``router``."""
    paths: dict[str, dict[str, Any]] = {}
    for route in router.routes:
        if route.include_in_schema:
            paths.setdefault(route.template, {})[route.method.lower()] = _operation(route)
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {
            "schemas": {"Error": ERROR_SCHEMA},
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer",
                           "description": "the token from the identity's credentials.json"},
            },
        },
    }


def _operation(route: Route) -> dict[str, Any]:
    op: dict[str, Any] = {"operationId": route.operation_id, "summary": route.summary}
    description = route.description
    if route.roles is None:
        op["security"] = []
        op["x-roles"] = []
    else:
        roles = sorted(route.roles)
        op["security"] = [{"bearer": []}]
        op["x-roles"] = roles
        description = f"{description}\n\nAllowed roles: {', '.join(roles)}.".strip()
    if description:
        op["description"] = description
    if route.tags:
        op["tags"] = list(route.tags)
    params = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in route.param_names
    ]
    params += [
        {"name": q.name, "in": "query", "required": q.required, "schema": q.schema(),
         **({"description": q.description} if q.description else {})}
        for q in route.query
    ]
    if params:
        op["parameters"] = params
    if route.body == "json":
        op["requestBody"] = {"required": True, "content": {
            JSON_TYPE: {"schema": dict(route.request_schema or {})}}}
    elif route.body == "octet":
        op["requestBody"] = {"required": True, "content": {
            OCTET_TYPE: {"schema": {"type": "string", "contentMediaType": OCTET_TYPE}}}}
    ok: dict[str, Any] = {"description": route.summary}
    if route.response_type == JSON_TYPE:
        ok["content"] = {JSON_TYPE: {"schema": dict(route.response_schema or {})}}
    elif route.response_type is not None:
        ok["content"] = {route.response_type: {"schema": {"type": "string",
                                                          "contentMediaType": route.response_type}}}
    responses: dict[str, Any] = {str(route.status): ok}
    for status in _error_statuses(route):
        responses[str(status)] = {
            "description": _REASONS.get(status, "Error"),
            "content": {JSON_TYPE: {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
    op["responses"] = responses
    return op


def _error_statuses(route: Route) -> list[int]:
    statuses = {431, 500, *route.errors}
    if route.roles is not None:
        statuses |= {401, 403}
    if route.query or route.body == "json":
        statuses.add(422)
    if route.body != "none":
        statuses |= {400, 413, 415}
    return sorted(statuses)


def openapi_route(*, title: str | None = None, version: str | None = None) -> Route:
    """A public ``GET /openapi.json`` route describing the app it is mounted in."""

    async def handler(request: Request) -> Response:
        app = request.app
        return json_response(openapi_document(app.router, title=title or app.title,
                                              version=version or app.version))

    return Route("GET", "/openapi.json", handler, "The OpenAPI 3.1 description of this server",
                 roles=None, response_schema={"type": "object"}, tags=("meta",))
