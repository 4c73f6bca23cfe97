"""Routes and the router: (method, path template) -> async handler plus its description.

A ``Route`` carries everything the HTTP layer enforces and the OpenAPI document
publishes: the roles allowed to call it (``None`` = public), what its body is
(``json``, ``octet`` or nothing) with the request schema, the declared query
parameters, and the response schema. Templates are literal segments and
``{name}`` placeholders that match exactly one non-empty segment; a literal beats a
placeholder in the same position, so ``/v1/tasks/next`` wins over
``/v1/tasks/{task_id}``.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import unquote

from engine.errors import ConfigError
from engine.server.schema import check_schema

if TYPE_CHECKING:
    from engine.server.http import Request, Response

__all__ = ["BodyKind", "Handler", "Match", "QueryParam", "Route", "Router"]

BodyKind = Literal["json", "octet", "none"]
Handler = Callable[["Request"], Awaitable["Response"]]
QueryKind = Literal["string", "integer", "number", "boolean"]

_METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH"})
_PARAM = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}$")
_LITERAL = re.compile(r"^[A-Za-z0-9._~!$&'()*+,;=:@-]+$")


@dataclass(frozen=True, slots=True)
class QueryParam:
    """One declared query parameter; undeclared parameters are refused (422)."""

    name: str
    kind: QueryKind = "string"
    required: bool = False
    default: Any = None
    description: str = ""
    minimum: float | None = None
    maximum: float | None = None

    def schema(self) -> dict[str, Any]:
        """JSON schema of the parameter's value (for OpenAPI)."""
        out: dict[str, Any] = {"type": self.kind}
        if self.minimum is not None:
            out["minimum"] = self.minimum
        if self.maximum is not None:
            out["maximum"] = self.maximum
        if self.default is not None:
            out["default"] = self.default
        return out


@dataclass(frozen=True, slots=True)
class Route:
    """One operation: method, path template, handler and its published contract."""

    method: str
    template: str
    handler: Handler
    summary: str
    #: roles allowed to call the route; None = public (no credential needed)
    roles: frozenset[str] | None
    body: BodyKind = "none"
    request_schema: Mapping[str, Any] | None = None
    response_schema: Mapping[str, Any] | None = None
    #: media type of a successful response body (None: no body)
    response_type: str | None = "application/json"
    status: int = 200
    description: str = ""
    query: tuple[QueryParam, ...] = ()
    tags: tuple[str, ...] = ()
    operation_id: str = ""
    #: error statuses the handler itself may answer (404, 409, ...), for the document
    errors: tuple[int, ...] = ()
    include_in_schema: bool = True
    segments: tuple[str | None, ...] = field(default=(), compare=False)
    param_names: tuple[str, ...] = field(default=(), compare=False)


@dataclass(frozen=True, slots=True)
class Match:
    """The outcome of routing one request path."""

    route: Route | None
    params: dict[str, str]
    #: methods accepted at this path (non-empty with route None means 405)
    allowed: tuple[str, ...]


def _compile(template: str) -> tuple[tuple[str | None, ...], tuple[str, ...]]:
    if not template.startswith("/"):
        raise ConfigError(f"route template {template!r} must start with '/'")
    if template == "/":
        return (), ()
    segments: list[str | None] = []
    names: list[str] = []
    for part in template[1:].split("/"):
        param = _PARAM.match(part)
        if param:
            if param.group(1) in names:
                raise ConfigError(f"route template {template!r} repeats {{{param.group(1)}}}")
            names.append(param.group(1))
            segments.append(None)
        elif _LITERAL.match(part):
            segments.append(part)
        else:
            raise ConfigError(f"route template {template!r}: bad segment {part!r}")
    return tuple(segments), tuple(names)


class Router:
    """Holds routes and finds the one a request means."""

    def __init__(self, routes: Iterable[Route] = ()) -> None:
        self._routes: list[Route] = []
        self._exact: dict[str, dict[str, Route]] = {}
        self._templated: list[Route] = []
        for route in routes:
            self.add(route)

    @property
    def routes(self) -> tuple[Route, ...]:
        """Every route, in registration order."""
        return tuple(self._routes)

    def add(self, route: Route) -> Route:
        """Register ``route`` (validated: method, template, schemas, no duplicate)."""
        method = route.method.upper()
        if method not in _METHODS:
            raise ConfigError(f"route {route.template!r}: unsupported method {route.method!r}")
        segments, names = _compile(route.template)
        if route.request_schema is not None:
            if route.body != "json":
                raise ConfigError(f"route {method} {route.template}: a request schema needs body='json'")
            check_schema(route.request_schema, f"{method} {route.template} request")
        if route.response_schema is not None:
            check_schema(route.response_schema, f"{method} {route.template} response")
        for q in route.query:
            if q.name in names:
                raise ConfigError(f"route {method} {route.template}: {q.name!r} is both path and query")
        for existing in self._routes:
            if existing.method == method and existing.segments == segments:
                raise ConfigError(
                    f"route {method} {route.template} clashes with {existing.method} {existing.template}"
                )
        op_id = route.operation_id or _operation_id(method, route.template)
        if any(r.operation_id == op_id for r in self._routes):
            raise ConfigError(f"route {method} {route.template}: operation id {op_id!r} is taken")
        compiled = replace(route, method=method, operation_id=op_id, segments=segments, param_names=names)
        self._routes.append(compiled)
        if names:
            self._templated.append(compiled)
        else:
            self._exact.setdefault(route.template, {})[method] = compiled
        return compiled

    def include(self, other: Router) -> None:
        """Add every route of ``other``."""
        for route in other.routes:
            self.add(route)

    def route(self, method: str, template: str, *, summary: str, roles: frozenset[str] | None,
              **spec: Any) -> Callable[[Handler], Handler]:
        """Decorator registering an async handler; ``spec`` are the other ``Route`` fields."""

        def register(handler: Handler) -> Handler:
            self.add(Route(method=method, template=template, handler=handler, summary=summary,
                           roles=roles, **spec))
            return handler

        return register

    def match(self, method: str, raw_path: str) -> Match:
        """Find the route for ``method`` at ``raw_path`` (percent-encoded, without query)."""
        exact = self._exact.get(raw_path)
        if exact is not None and "%" not in raw_path:
            route = exact.get(method)
            if route is not None:
                return Match(route, {}, tuple(exact))
        parts = [] if raw_path == "/" else raw_path[1:].split("/")
        # split before decoding, so an encoded '/' stays inside its parameter
        decoded = [unquote(p) for p in parts]
        best: dict[str, tuple[tuple[int, ...], Route, dict[str, str]]] = {}
        for route in self._routes:
            if len(route.segments) != len(parts):
                continue
            params: dict[str, str] = {}
            score: list[int] = []
            names = iter(route.param_names)
            for want, raw, text in zip(route.segments, parts, decoded, strict=True):
                if want is None:
                    if not raw:
                        break
                    params[next(names)] = text
                    score.append(0)
                elif want == text:
                    score.append(1)
                else:
                    break
            else:
                key = tuple(score)
                if route.method not in best or key > best[route.method][0]:
                    best[route.method] = (key, route, params)
        allowed = tuple(sorted(best))
        hit = best.get(method)
        if hit is None:
            return Match(None, {}, allowed)
        return Match(hit[1], hit[2], allowed)


def _operation_id(method: str, template: str) -> str:
    words = [p.strip("{}") for p in template.strip("/").replace(".", "_").split("/") if p]
    return "_".join([method.lower(), *words]) if words else method.lower()
