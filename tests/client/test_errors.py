"""Error answers become RemoteError / AuthError carrying what the server said."""

from __future__ import annotations

import orjson
import pytest

from engine.client.errors import AuthError, RemoteError, TransportError, error_from_response
from engine.errors import EngineError

JSON = {"content-type": "application/json"}


def test_json_error_body_is_unpacked() -> None:
    body = orjson.dumps({"error": {"code": "invalid_fields", "message": "1 problem", "fields": [1]}})
    exc = error_from_response("POST", "http://h/v1/x", 422, JSON, body)
    assert type(exc) is RemoteError
    assert (exc.status, exc.code, exc.message, exc.details) == (422, "invalid_fields", "1 problem", {"fields": [1]})
    assert str(exc) == "POST http://h/v1/x: 422 invalid_fields: 1 problem"


@pytest.mark.parametrize("status", [401, 403])
def test_auth_statuses_are_auth_errors(status: int) -> None:
    body = orjson.dumps({"error": {"code": "forbidden", "message": "no"}})
    exc = error_from_response("GET", "u", status, {**JSON, "www-authenticate": "Bearer"}, body)
    assert isinstance(exc, AuthError) and exc.status == status
    assert exc.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(("headers", "body", "message"), [
    ({"content-type": "text/html"}, b"<h1>Bad gateway</h1>", "<h1>Bad gateway</h1>"),
    (JSON, b'{"detail": "framework style"}', '{"detail": "framework style"}'),
    (JSON, b"{not json", "{not json"),
    ({}, b"", "(empty response body)"),
    ({}, b"x" * 1000, "x" * 300),
    ({}, b"\xff\xfe oops", "\ufffd\ufffd oops"),
])
def test_other_error_bodies_are_quoted(headers: dict[str, str], body: bytes, message: str) -> None:
    exc = error_from_response("GET", "u", 502, headers, body)
    assert (exc.code, exc.message) == ("http_502", message)


def test_errors_belong_to_the_engine_tree() -> None:
    assert issubclass(TransportError, EngineError)
    assert issubclass(AuthError, RemoteError) and issubclass(RemoteError, EngineError)
    exc = TransportError("GET", "u", "connection refused")
    assert str(exc) == "GET u: connection refused" and not exc.maybe_processed
    assert "may have processed" in str(TransportError("POST", "u", "reset", maybe_processed=True))
