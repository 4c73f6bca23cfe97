"""Errors a client sees when talking to a fedlog server.

They are defined in ``engine.errors`` (the one error tree) and re-exported here::

    EngineError
    ├── TransportError      .method, .url, .reason, .maybe_processed  (no HTTP answer)
    └── RemoteError         .status, .code, .message, .details, .headers  (the server said no)
        └── AuthError       401 (who are you?) or 403 (not allowed)

``TransportError`` means no HTTP response arrived (connection refused, reset, timed
out, TLS failure). ``maybe_processed`` is true when the request was sent in full and
the server may have acted on it: the caller decides whether repeating it is safe.
``RemoteError`` carries the server's JSON error (``{"error": {"code", "message", ...}}``)
or, for a non-JSON answer (a proxy, a malformed-request rejection from the HTTP
layer), a code ``http_<status>`` and the start of the text.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from engine.errors import AuthError, RemoteError, TransportError

__all__ = ["AuthError", "RemoteError", "TransportError", "error_from_response"]

#: how much of a non-JSON error body is quoted in the message
_QUOTE_LIMIT = 300


def error_from_response(
    method: str, url: str, status: int, headers: Mapping[str, str], body: bytes
) -> RemoteError:
    """Build the error for an HTTP error response (``status`` >= 400).

    Args:
        method: the request method.
        url: the request URL (for the message).
        status: the response status.
        headers: response headers, lower-case names.
        body: the response body.

    Returns:
        ``AuthError`` for 401 and 403, ``RemoteError`` otherwise.
    """
    code, message, details = f"http_{status}", "", {}
    parsed: Any = None
    if body and headers.get("content-type", "").split(";")[0].strip() == "application/json":
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            parsed = None
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if isinstance(error, dict) and isinstance(error.get("code"), str):
        code = error["code"]
        message = str(error.get("message", ""))
        details = {k: v for k, v in error.items() if k not in ("code", "message")}
    else:
        text = body[:_QUOTE_LIMIT].decode("utf-8", errors="replace").strip()
        message = text or "(empty response body)"
    cls = AuthError if status in (401, 403) else RemoteError
    return cls(method, url, status, code, message, details=details, headers=headers)
