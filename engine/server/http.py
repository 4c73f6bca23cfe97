"""A plain ASGI application: routing, limits, auth, JSON errors; no framework.

Measured on loopback with 1 MiB bodies, a bare ASGI app on uvicorn moved several
times the bytes per second of the usual frameworks and clients (see DESIGN.md), so
this layer stays small: an ``App`` dispatches each request to the ``Route`` the
``Router`` finds, after enforcing, in this order (cheapest first, so a rejected
request costs little and changes nothing):

1. header count and size (431),
2. route and method (404, 405 with ``Allow``),
3. credential and role (401 with ``WWW-Authenticate``, 403) - reported to the audit hook,
4. query parameters (422),
5. the body: content type (415), declared length (413 before anything is read),
   JSON syntax (400), JSON fields against the route's schema (422).

Every error answer is JSON: ``{"error": {"code": "...", "message": "...", ...}}``.
A handler failing unexpectedly gets a 500 whose body names only an incident id;
the traceback goes to the log. Handlers never close connections: keep-alive is
uvicorn's business, and a response is always complete and length-delimited.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import orjson

from engine.errors import ConcurrencyConflict, ConfigError, TransitionRejected, UnknownMachine
from engine.server.auth import AuditEvent, AuditHook, Authenticator, Identity
from engine.server.errors import ClientDisconnected, HttpError
from engine.server.routing import QueryParam, Route, Router
from engine.server.schema import validate

__all__ = [
    "App",
    "ClientDisconnected",
    "HttpError",
    "Limits",
    "Request",
    "Response",
    "bytes_response",
    "empty_response",
    "json_response",
    "parts_response",
]

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ErrorMapper = Callable[[Exception], "HttpError"]

JSON_TYPE = "application/json"
OCTET_TYPE = "application/octet-stream"


@dataclass(frozen=True, slots=True)
class Limits:
    """Request size limits enforced before (or while) a request is read."""

    #: largest JSON body accepted (bytes)
    max_json_bytes: int = 1 << 20
    #: largest application/octet-stream body accepted (bytes)
    max_octet_bytes: int = 64 << 20
    #: most request headers accepted
    max_header_count: int = 64
    #: largest total of header names and values (bytes)
    max_header_bytes: int = 16 << 10


@dataclass(frozen=True, slots=True)
class Response:
    """A complete response: status, headers and a length-delimited body."""

    status: int
    body: bytes | bytearray | memoryview = b""
    content_type: str | None = None
    headers: Mapping[str, str] | None = None
    #: a body in pieces, sent one after another (instead of ``body``): several chunks in one
    #: answer go out from where they lie, without being joined into one buffer first
    parts: tuple[bytes | bytearray | memoryview, ...] = ()

    @property
    def length(self) -> int:
        """The body's length in bytes."""
        return sum(len(p) for p in self.parts) if self.parts else len(self.body)


def json_response(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    """A JSON response (serialised with orjson)."""
    return Response(status, orjson.dumps(data), JSON_TYPE, headers)


def bytes_response(
    data: bytes | bytearray | memoryview, status: int = 200, content_type: str = OCTET_TYPE,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """A raw bytes response (``application/octet-stream`` unless told otherwise)."""
    return Response(status, data, content_type, headers)


def parts_response(
    parts: Sequence[bytes | bytearray | memoryview], status: int = 200, content_type: str = OCTET_TYPE,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """A raw bytes response whose body is ``parts`` one after another."""
    return Response(status, b"", content_type, headers, tuple(parts))


def empty_response(status: int = 204, headers: Mapping[str, str] | None = None) -> Response:
    """A response without a body."""
    return Response(status, b"", None, headers)


class Request:
    """One request as a handler sees it."""

    def __init__(self, app: App, scope: Scope, receive: Receive, route: Route,
                 path_params: dict[str, str], headers: dict[str, str]) -> None:
        self.app = app
        self.route = route
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.path_params = path_params
        self.headers = headers
        client = scope.get("client")
        self.client: str | None = f"{client[0]}:{client[1]}" if client else None
        #: the authenticated caller (None on public routes)
        self.identity: Identity | None = None
        #: the query string's parameters as sent (text)
        self.query: dict[str, str] = {}
        #: declared query parameters, converted to their kinds (defaults filled in)
        self.params: dict[str, Any] = {}
        self._receive = receive
        self._consumed = False
        self._json: Any = _UNSET

    @property
    def content_length(self) -> int | None:
        """The declared Content-Length, or None (chunked or absent)."""
        raw = self.headers.get("content-length")
        return int(raw) if raw is not None else None

    async def stream(self, limit: int | None = None) -> AsyncIterator[bytes]:
        """Yield the body in the pieces it arrives in, refusing to go past ``limit`` (413).

        The body can be read once (by this, ``body`` or ``json``). A handler that
        streams must not act on a partial body: a 413 or a disconnect can end it.
        """
        if self._consumed:
            raise RuntimeError("the request body was already read")
        self._consumed = True
        cap = self._default_limit() if limit is None else limit
        seen = 0
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnected()
            chunk: bytes = message.get("body", b"")
            seen += len(chunk)
            if seen > cap:
                raise _too_large(cap, "body")
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                return

    async def body(self, limit: int | None = None) -> bytes:
        """The whole body (at most ``limit`` bytes, else 413)."""
        chunks = [chunk async for chunk in self.stream(limit)]
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def json(self) -> Any:
        """The parsed JSON body (parsed and validated before the handler ran)."""
        if self._json is _UNSET:
            data = await self.body(self.app.limits.max_json_bytes)
            if not data:
                raise HttpError(400, "malformed_json", "the body is empty; a JSON document is required")
            try:
                self._json = orjson.loads(data)
            except orjson.JSONDecodeError as exc:
                raise HttpError(400, "malformed_json", f"the body is not valid JSON: {exc}") from None
        return self._json

    def require_identity(self, name: str) -> Identity:
        """Allow the admin or the identity called ``name``; 403 for anyone else.

        This is how handlers keep a site to its own tasks and results.
        """
        who = self.identity
        if who is None:
            raise HttpError(401, "unauthenticated", "this route needs a credential")
        if who.role == "admin" or who.name == name:
            return who
        message = f"{who.role} {who.name!r} may not act for {name!r} at {self.method} {self.path}"
        self.app.audit(AuditEvent("forbidden", self.method, self.path, self.route.template,
                                  who.name, who.role, message, self.client))
        raise HttpError(403, "forbidden", message)

    def _default_limit(self) -> int:
        limits = self.app.limits
        return limits.max_json_bytes if self.route.body != "octet" else limits.max_octet_bytes


_UNSET: Any = object()


def _error_response(error: HttpError) -> Response:
    return json_response(error.body(), status=error.status, headers=error.headers)


def _too_large(limit: int, what: str) -> HttpError:
    return HttpError(413, "payload_too_large", f"the request {what} exceeds the limit of {limit} bytes",
                     details={"limit": limit})


def default_error_mapper(exc: Exception) -> HttpError | None:
    """Map the engine's own errors to HTTP answers (None: an unexpected failure)."""
    if isinstance(exc, HttpError):
        return exc
    if isinstance(exc, UnknownMachine):
        return HttpError(404, "unknown_machine", str(exc), details={"machine_id": exc.machine_id})
    if isinstance(exc, TransitionRejected):
        return HttpError(409, "transition_rejected", str(exc),
                         details={"state": exc.state, "trigger": exc.trigger})
    if isinstance(exc, ConcurrencyConflict):
        return HttpError(409, "conflict", str(exc))
    return None


class App:
    """The ASGI application: give it a router, an authenticator and limits."""

    def __init__(
        self,
        router: Router,
        *,
        authenticator: Authenticator | None = None,
        limits: Limits | None = None,
        audit: AuditHook | None = None,
        title: str = "fedlog",
        version: str = "0",
        error_mappers: Sequence[ErrorMapper] = (),
        on_startup: Sequence[Callable[[], Awaitable[None]]] = (),
        on_shutdown: Sequence[Callable[[], Awaitable[None]]] = (),
        check_responses: bool = False,
    ) -> None:
        self.router = router
        self.authenticator = authenticator
        self.limits = limits or Limits()
        self.title = title
        self.version = version
        self._audit = audit
        self._mappers = list(error_mappers)
        self._on_startup = list(on_startup)
        self._on_shutdown = list(on_shutdown)
        #: validate JSON responses against the route's schema (tests): a mismatch is a 500
        self.check_responses = check_responses
        #: what the handlers serve (the fedlog server object); set by whoever builds the app
        self.state: Any = None
        #: requests answered and body bytes read and written since the app started
        self.traffic: dict[str, int] = {"requests": 0, "bytes_in": 0, "bytes_out": 0}
        self._audits: list[Awaitable[None]] = []
        if any(r.roles is not None for r in router.routes) and authenticator is None:
            raise ConfigError("some routes need a credential but the app was given no authenticator")

    def audit(self, event: AuditEvent) -> None:
        """Report an access failure to the audit hook; its own failures are only logged."""
        logger.info("access refused: %s %s %s (%s)", event.kind, event.method, event.path, event.reason)
        if self._audit is None:
            return
        try:
            pending = self._audit(event)
        except Exception:
            logger.exception("the audit hook failed on %s", event)
            return
        if pending is not None:
            self._audits.append(pending)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        # websockets are not served: uvicorn answers 403 when the app returns without accepting

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            phase = message["type"].rsplit(".", 1)[-1]
            hooks = self._on_startup if phase == "startup" else self._on_shutdown
            try:
                for hook in hooks:
                    await hook()
            except Exception as exc:
                logger.exception("lifespan %s failed", phase)
                await send({"type": f"lifespan.{phase}.failed", "message": str(exc)})
                return
            await send({"type": f"lifespan.{phase}.complete"})
            if phase == "shutdown":
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            response = await self._dispatch(scope, receive)
        except ClientDisconnected:
            logger.debug("client went away during %s %s", scope["method"], scope["path"])
            return
        if self._audits:  # a refusal is answered once its audit record is durable
            pending, self._audits = self._audits, []
            for outcome in await asyncio.gather(*pending, return_exceptions=True):
                if isinstance(outcome, BaseException):
                    logger.error("recording an audit event failed: %r", outcome)
        await _send_response(send, response)
        traffic = self.traffic
        traffic["requests"] += 1
        traffic["bytes_out"] += response.length
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit():
                traffic["bytes_in"] += int(value)

    async def _dispatch(self, scope: Scope, receive: Receive) -> Response:
        method, path = scope["method"], scope["path"]
        try:
            headers = self._read_headers(scope["headers"])
            raw_path = scope.get("raw_path")
            found = self.router.match(method, raw_path.decode("latin-1") if raw_path else path)
            if found.route is None:
                if found.allowed:
                    raise HttpError(405, "method_not_allowed",
                                    f"{method} is not allowed at {path}; allowed: {', '.join(found.allowed)}",
                                    headers={"Allow": ", ".join(found.allowed)},
                                    details={"allowed": list(found.allowed)})
                raise HttpError(404, "not_found", f"no route {path}")
            route = found.route
            request = Request(self, scope, receive, route, found.params, headers)
            if route.roles is not None:
                request.identity = self._authorize(request, route)
            request.query, request.params = _parse_query(route.query, scope.get("query_string", b""))
            await self._check_body(request, route)
            response = await route.handler(request)
            if not isinstance(response, Response):
                raise TypeError(f"{route.method} {route.template} returned {type(response).__name__}, "
                                "not a Response")
            if self.check_responses:
                self._check_response(route, response)
            return response
        except ClientDisconnected:
            raise
        except Exception as exc:
            return self._error_response(exc, method, path)

    def _read_headers(self, raw: list[tuple[bytes, bytes]]) -> dict[str, str]:
        limits = self.limits
        if len(raw) > limits.max_header_count:
            raise HttpError(431, "headers_too_large",
                            f"{len(raw)} request headers; the limit is {limits.max_header_count}",
                            details={"limit": limits.max_header_count})
        size = sum(len(k) + len(v) for k, v in raw)
        if size > limits.max_header_bytes:
            raise HttpError(431, "headers_too_large",
                            f"the request headers hold {size} bytes; the limit is {limits.max_header_bytes}",
                            details={"limit": limits.max_header_bytes})
        # latin-1 maps every byte, so no header can make decoding fail
        return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in raw}

    def _authorize(self, request: Request, route: Route) -> Identity:
        assert self.authenticator is not None  # checked in __init__
        allowed = route.roles or frozenset()
        try:
            identity = self.authenticator.authenticate(request.headers.get("authorization"))
        except HttpError as exc:
            self.audit(AuditEvent("unauthenticated", request.method, request.path, route.template,
                                  exc.details.get("claimed"), None, exc.message, request.client))
            exc.details.pop("claimed", None)
            raise
        if identity.role not in allowed:
            message = (f"role {identity.role!r} ({identity.name!r}) may not call "
                       f"{route.method} {route.template}; allowed roles: {', '.join(sorted(allowed))}")
            self.audit(AuditEvent("forbidden", request.method, request.path, route.template,
                                  identity.name, identity.role, message, request.client))
            raise HttpError(403, "forbidden", message, details={"role": identity.role})
        return identity

    async def _check_body(self, request: Request, route: Route) -> None:
        if route.body == "none":
            return
        expected = JSON_TYPE if route.body == "json" else OCTET_TYPE
        raw_type = request.headers.get("content-type", "")
        media, _, rest = raw_type.partition(";")
        charset = rest.strip().lower()
        if media.strip().lower() != expected or (charset and charset not in ("charset=utf-8", "charset=\"utf-8\"")):
            shown = raw_type or "none"
            raise HttpError(415, "unsupported_media_type",
                            f"{route.method} {route.template} takes Content-Type {expected}, got {shown}")
        try:
            declared = request.content_length
        except ValueError:
            raise HttpError(400, "bad_request", "the Content-Length header is not a number") from None
        limit = request._default_limit()
        if declared is not None and declared > limit:
            raise _too_large(limit, "body")
        if route.body == "json":
            value = await request.json()
            if route.request_schema is not None:
                problems = validate(route.request_schema, value)
                if problems:
                    raise HttpError(422, "invalid_fields",
                                    f"{len(problems)} field problem(s): {problems[0].path} {problems[0].message}",
                                    details={"fields": [p.as_dict() for p in problems]})

    def _check_response(self, route: Route, response: Response) -> None:
        if route.response_schema is None or response.content_type != JSON_TYPE or response.status >= 400:
            return
        problems = validate(route.response_schema, orjson.loads(bytes(response.body)))
        if problems:
            raise RuntimeError(f"{route.method} {route.template} answered outside its schema: {problems}")

    def _error_response(self, exc: Exception, method: str, path: str) -> Response:
        for mapper in (*self._mappers, default_error_mapper):
            mapped = mapper(exc)
            if mapped is not None:
                if mapped.status >= 500:
                    logger.error("%s %s failed: %s", method, path, mapped)
                return _error_response(mapped)
        incident = secrets.token_hex(6)
        logger.error("%s %s failed (incident %s)", method, path, incident, exc_info=exc)
        return _error_response(HttpError(500, "internal_error",
                         f"the server failed to handle this request; see its log (incident {incident})",
                         details={"incident": incident}))


def _parse_query(declared: tuple[QueryParam, ...], raw: bytes) -> tuple[dict[str, str], dict[str, Any]]:
    try:
        pairs = parse_qsl(raw.decode("ascii"), keep_blank_values=True, strict_parsing=False,
                          errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise HttpError(400, "bad_request", "the query string is not valid") from None
    by_name = {q.name: q for q in declared}
    problems: list[dict[str, str]] = []
    values: dict[str, Any] = {}
    texts: dict[str, str] = {}
    for name, text in pairs:
        texts.setdefault(name, text)
        spec = by_name.get(name)
        if spec is None:
            problems.append({"path": f"query.{name}", "message": "is not a parameter of this route"})
        elif name in values:
            problems.append({"path": f"query.{name}", "message": "is given more than once"})
        else:
            try:
                values[name] = _convert(spec, text)
            except HttpError as exc:
                problems.append({"path": f"query.{name}", "message": exc.message})
    for spec in declared:
        if spec.name not in values:
            if spec.required:
                problems.append({"path": f"query.{spec.name}", "message": "is required"})
            else:
                values[spec.name] = spec.default
    if problems:
        raise HttpError(422, "invalid_fields",
                        f"{len(problems)} query problem(s): {problems[0]['path']} {problems[0]['message']}",
                        details={"fields": problems})
    return texts, values


def _convert(spec: QueryParam, text: str) -> Any:
    value: Any
    if spec.kind == "string":
        return text
    if spec.kind == "boolean":
        if text.lower() in ("true", "1"):
            return True
        if text.lower() in ("false", "0"):
            return False
        raise HttpError(422, "invalid_fields", f"must be true or false, got {text!r}")
    try:
        value = int(text) if spec.kind == "integer" else float(text)
    except ValueError:
        raise HttpError(422, "invalid_fields", f"must be an {spec.kind}, got {text!r}") from None
    if spec.kind == "number" and value != value:  # NaN
        raise HttpError(422, "invalid_fields", "must be a number, got NaN")
    if spec.minimum is not None and value < spec.minimum:
        raise HttpError(422, "invalid_fields", f"must be >= {spec.minimum}")
    if spec.maximum is not None and value > spec.maximum:
        raise HttpError(422, "invalid_fields", f"must be <= {spec.maximum}")
    return value


async def _send_response(send: Send, response: Response) -> None:
    headers: list[tuple[bytes, bytes]] = [(b"content-length", str(response.length).encode())]
    if response.content_type is not None:
        headers.append((b"content-type", response.content_type.encode("latin-1")))
    for name, value in (response.headers or {}).items():
        headers.append((name.lower().encode("latin-1"), value.encode("latin-1")))
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    if not response.parts:
        await send({"type": "http.response.body", "body": response.body, "more_body": False})
        return
    last = len(response.parts) - 1
    for i, part in enumerate(response.parts):
        await send({"type": "http.response.body", "body": part, "more_body": i < last})
