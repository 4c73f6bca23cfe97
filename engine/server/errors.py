"""The HTTP layer's own errors: an error answer, and a client that went away.

``HttpError`` is raised by the HTTP layer or by a handler to answer with an error
status and the JSON body ``{"error": {"code", "message", ...details}}``. Both
are defined in ``engine.errors`` (the one tree) and re-exported here::

    EngineError
    ├── HttpError             .status, .code, .message, .headers, .details
    └── ClientDisconnected    the peer left while its request body was read
"""

from __future__ import annotations

from engine.errors import ClientDisconnected, HttpError

__all__ = ["ClientDisconnected", "HttpError"]


