"""The HTTP layer's own errors: an error answer, and a client that went away.

``HttpError`` is raised by the HTTP layer or by a handler to answer with an error
status and the JSON body ``{"error": {"code", "message", ...details}}``. Both
extend the engine's error tree::

    EngineError
    ├── HttpError             .status, .code, .message, .headers, .details
    └── ClientDisconnected    the peer left while its request body was read
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from engine.errors import EngineError

__all__ = ["ClientDisconnected", "HttpError"]


class HttpError(EngineError):
    """An error answer: status, stable code, message for people, extra JSON fields, headers."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: Mapping[str, str] | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})
        self.details = dict(details or {})
        super().__init__(f"{status} {code}: {message}")

    def body(self) -> dict[str, Any]:
        """The JSON document sent for this error."""
        return {"error": {"code": self.code, "message": self.message, **self.details}}


class ClientDisconnected(EngineError):
    """The peer went away while its request body was being read (there is no one to answer)."""
