"""How a client reaches the server: one seam, two implementations.

``Transport.request`` sends one request and returns the complete response, or
raises: ``TransportError`` when no HTTP answer came, ``AuthError`` for 401/403,
``RemoteError`` for any other error status. Two implementations:

* ``HttpTransport``: stdlib ``http.client`` (the fastest client measured here for
  1 MiB bodies), one kept-alive connection per thread. Before reusing an idle
  connection it checks whether the server closed it meanwhile (keep-alive timeout)
  and reconnects first; if a reused connection still breaks before any answer, an
  idempotent request is sent once more on a fresh connection, a non-idempotent
  one never is (``TransportError.maybe_processed`` tells the caller).
* ``AsgiTransport``: calls the ASGI app in this process, on an event loop of its
  own, so protocol tests run the real client code without sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import re
import select
import socket
import ssl
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import CancelledError as FutureCancelled
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlencode, urlsplit

import orjson

from engine.client.errors import TransportError, error_from_response
from engine.errors import ConfigError

__all__ = ["AsgiTransport", "HttpTransport", "Transport", "TransportResponse"]

IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
JSON_TYPE = "application/json"
OCTET_TYPE = "application/octet-stream"
DEFAULT_TIMEOUT = 60.0
# bodies above this are sent as a second write instead of being copied behind the head
_SEPARATE_BODY = 64 << 10

# what a server closing an idle keep-alive connection looks like to the sender
_STALE = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError, http.client.RemoteDisconnected)

Body = bytes | bytearray | memoryview
#: a body given as pieces (sent one after another, never joined): several chunks in one upload
Pieces = list[bytes | bytearray | memoryview]
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_HEADER_VALUE = re.compile(r"^[\t\x20-\x7e\x80-\xff]*$")


@dataclass(frozen=True, slots=True)
class TransportResponse:
    """A complete HTTP response: status, headers (lower-case names) and body."""

    status: int
    headers: Mapping[str, str]
    #: the bytes; a view of the caller's buffer when the request gave ``into``
    body: bytes | memoryview

    def json(self) -> Any:
        """The body parsed as JSON."""
        return orjson.loads(self.body)


class Transport(Protocol):
    """Sends one request to the server and returns its complete response."""

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        body: Body | Pieces | None = None,
        headers: Mapping[str, str] | None = None,
        query: Mapping[str, str | int | float | bool] | None = None,
        timeout: float | None = None,
        into: Callable[[int], memoryview] | None = None,
    ) -> TransportResponse:
        """Send ``method path`` with a JSON document or raw bytes (or pieces of them); raise on an error status.

        ``into(n)``: a writable buffer of ``n`` bytes for a successful answer's body of ``n``
        bytes, which the body is then read into (a hint: a transport may return bytes).
        """
        ...

    def close(self) -> None:
        """Release connections (or the in-process loop)."""
        ...


def _prepare(token: str | None, json: Any, body: Body | Pieces | None,
             headers: Mapping[str, str] | None) -> tuple[Body | Pieces | None, dict[str, str]]:
    if json is not None and body is not None:
        raise ConfigError("pass either json= or body=, not both")
    out: dict[str, str] = {"Accept": JSON_TYPE}
    if token is not None:
        if not _HEADER_VALUE.match(token):
            raise ConfigError("the token holds characters that cannot travel in an HTTP header")
        out["Authorization"] = f"Bearer {token}"
    payload: Body | Pieces | None = None
    if json is not None:
        payload = orjson.dumps(json)
        out["Content-Type"] = JSON_TYPE
    elif body is not None:
        payload = body
        out["Content-Type"] = OCTET_TYPE
    out["Content-Length"] = str(_length(payload))
    for name, value in (headers or {}).items():
        if not _HEADER_NAME.match(name) or not _HEADER_VALUE.match(value):
            raise ConfigError(f"request header {name!r}: {value[:40]!r} is not a valid HTTP header")
        out[name] = value
    return payload, out


def _length(payload: Body | Pieces | None) -> int:
    if payload is None:
        return 0
    if isinstance(payload, list):
        return sum(len(p) for p in payload)
    return len(payload)


def _target(prefix: str, path: str, query: Mapping[str, Any] | None) -> str:
    if not path.startswith("/"):
        raise ConfigError(f"request path {path!r} must start with '/'")
    if not path.isascii() or any(c <= " " or c == "\x7f" for c in path):
        raise ConfigError(f"request path {path!r} must be percent-encoded ASCII without spaces")
    target = prefix + path
    if query:
        text = {k: ("true" if v is True else "false" if v is False else str(v)) for k, v in query.items()}
        target += ("&" if "?" in target else "?") + urlencode(text)
    return target


async def _cancel_pending() -> None:
    """Cancel every other task of the running loop and wait for them to end."""
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class HttpTransport:
    """HTTP/1.1 over stdlib ``http.client``: one keep-alive connection per thread."""

    def __init__(self, base_url: str, token: str | None, *, tls_ca: Path | str | None = None,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"server URL {base_url!r} must look like http(s)://HOST:PORT")
        self.base_url = base_url.rstrip("/")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        try:
            self._port = parts.port or (443 if self._https else 80)
        except ValueError as exc:
            raise ConfigError(f"server URL {base_url!r}: {exc}") from None
        self._prefix = parts.path.rstrip("/")
        self._token = token
        self._timeout = timeout
        self._context: ssl.SSLContext | None = None
        if self._https:
            self._context = ssl.create_default_context(cafile=str(tls_ca) if tls_ca else None)
        elif tls_ca is not None:
            raise ConfigError(f"a CA certificate was given but {base_url!r} is not https")
        self._local = threading.local()
        self._all: set[http.client.HTTPConnection] = set()
        self._lock = threading.Lock()
        self._closed = False
        #: connections opened so far (tests check keep-alive with it)
        self.connections_opened = 0

    def _new_connection(self, timeout: float) -> http.client.HTTPConnection:
        if self._closed:
            raise ConfigError("this transport is closed")
        conn: http.client.HTTPConnection
        if self._https:
            conn = http.client.HTTPSConnection(self._host, self._port, timeout=timeout, context=self._context)
        else:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=timeout)
        with self._lock:
            self._all.add(conn)
            self.connections_opened += 1
        self._local.conn = conn
        return conn

    def _drop(self, conn: http.client.HTTPConnection) -> None:
        conn.close()
        with self._lock:
            self._all.discard(conn)
        if getattr(self._local, "conn", None) is conn:
            self._local.conn = None

    def _connection(self, timeout: float) -> tuple[http.client.HTTPConnection, bool]:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is not None and conn.sock is not None and _peer_closed(conn.sock):
            # the server closed it while idle (keep-alive timeout): reconnect before sending
            self._drop(conn)
            conn = None
        if conn is None or conn.sock is None:
            if conn is not None:
                self._drop(conn)
            return self._new_connection(timeout), False
        conn.timeout = timeout
        conn.sock.settimeout(timeout)
        return conn, True

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        body: Body | Pieces | None = None,
        headers: Mapping[str, str] | None = None,
        query: Mapping[str, str | int | float | bool] | None = None,
        timeout: float | None = None,
        into: Callable[[int], memoryview] | None = None,
    ) -> TransportResponse:
        """Send one request and return the complete response (see the module docstring)."""
        method = method.upper()
        payload, hdrs = _prepare(self._token, json, body, headers)
        target = _target(self._prefix, path, query)
        url = self.base_url + target[len(self._prefix):]
        wait = self._timeout if timeout is None else timeout
        conn, reused = self._connection(wait)
        try:
            status, rheaders, data = self._exchange(conn, method, target, payload, hdrs, into)
        except _STALE as exc:
            self._drop(conn)
            if not (reused and method in IDEMPOTENT):
                raise TransportError(method, url, f"connection lost ({exc.__class__.__name__})",
                                     maybe_processed=method not in IDEMPOTENT) from None
            conn, _ = self._connection(wait)
            status, rheaders, data = self._guarded(conn, method, url, target, payload, hdrs, into)
        except OSError as exc:
            self._drop(conn)
            raise _os_error(method, url, exc) from None
        except http.client.HTTPException as exc:
            self._drop(conn)
            raise TransportError(method, url, f"bad HTTP response: {exc!r}", maybe_processed=True) from None
        if status >= 400:
            raise error_from_response(method, url, status, rheaders, bytes(data))  # read whole: never ``into``
        return TransportResponse(status, rheaders, data)

    def _guarded(self, conn: http.client.HTTPConnection, method: str, url: str, target: str,
                 payload: Body | Pieces | None, hdrs: dict[str, str], into: Callable[[int], memoryview] | None
                 ) -> tuple[int, dict[str, str], bytes | memoryview]:
        try:
            return self._exchange(conn, method, target, payload, hdrs, into)
        except (OSError, http.client.HTTPException) as exc:
            self._drop(conn)
            if isinstance(exc, OSError) and not isinstance(exc, _STALE):
                raise _os_error(method, url, exc) from None
            raise TransportError(method, url, f"connection lost again ({exc.__class__.__name__})",
                                 maybe_processed=method not in IDEMPOTENT) from None

    def _exchange(self, conn: http.client.HTTPConnection, method: str, target: str, payload: Body | Pieces | None,
                  hdrs: dict[str, str], into: Callable[[int], memoryview] | None = None
                  ) -> tuple[int, dict[str, str], bytes | memoryview]:
        if payload is not None and len(payload) > _SEPARATE_BODY and isinstance(payload, bytes):
            # a memoryview is written after the head instead of being appended to it (a copy)
            payload = memoryview(payload)
        conn.request(method, target, body=payload, headers=hdrs)
        resp = conn.getresponse()
        data: bytes | memoryview
        if into is not None and resp.status < 300 and resp.length:
            data = _read_into(resp, into(resp.length))
        else:
            data = resp.read()
        headers = {k.lower(): v for k, v in resp.getheaders()}
        if resp.will_close:
            self._drop(conn)
        return resp.status, headers, data

    def close(self) -> None:
        """Close every connection this transport opened (in any thread)."""
        self._closed = True
        with self._lock:
            conns, self._all = list(self._all), set()
        for conn in conns:
            conn.close()

    def __enter__(self) -> HttpTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_into(resp: http.client.HTTPResponse, view: memoryview) -> memoryview:
    """Read the whole body (its length known) into ``view``; the filled view."""
    size = resp.length or 0
    got = 0
    while got < size:
        n = resp.readinto(view[got:size])
        if not n:
            raise http.client.IncompleteRead(bytes(view[:got]), size - got)
        got += n
    return view[:size]


def _peer_closed(sock: socket.socket) -> bool:
    """True if an idle connection is readable: the peer closed it (or sent junk)."""
    try:
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN | select.POLLHUP | select.POLLERR)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True


def _os_error(method: str, url: str, exc: OSError) -> TransportError:
    if isinstance(exc, TimeoutError | socket.timeout):
        return TransportError(method, url, "timed out waiting for the server", maybe_processed=True)
    if isinstance(exc, ssl.SSLError):
        return TransportError(method, url, f"TLS failure: {exc.reason or exc}")
    if isinstance(exc, ConnectionRefusedError):
        return TransportError(method, url, "connection refused (is the server running?)")
    return TransportError(method, url, f"{exc.__class__.__name__}: {exc.strerror or exc}")


class AsgiTransport:
    """Runs requests against an ASGI app in this process (no sockets).

    The app lives on a private event loop in a background thread, as it would in a
    server, so state it keeps (queues, events, long polls) behaves normally; lifespan
    start-up runs when the transport is created and shutdown when it is closed.
    """

    def __init__(self, app: Any, token: str | None, *, chunk_size: int = 64 << 10,
                 client: tuple[str, int] = ("127.0.0.1", 40000), lifespan: bool = True) -> None:
        self._app = app
        self._token = token
        self._chunk = chunk_size
        self._client = client
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="asgi-transport", daemon=True)
        self._thread.start()
        self._owns_loop = True
        self._lifespan: _Lifespan | None = None
        if lifespan:
            self._lifespan = _Lifespan(app)
            self._run(self._lifespan.startup(), 30.0, "lifespan", "startup")

    def with_token(self, token: str | None) -> AsgiTransport:
        """Another transport onto the same app and loop, carrying a different token."""
        twin = object.__new__(AsgiTransport)
        twin.__dict__.update(self.__dict__)
        twin._token = token
        twin._lifespan = None
        twin._owns_loop = False
        return twin

    def _run(self, coro: Any, timeout: float, method: str, url: str) -> Any:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except FutureTimeout:
            future.cancel()
            raise TransportError(method, url, "timed out waiting for the app", maybe_processed=True) from None
        except FutureCancelled:
            raise TransportError(method, url, "the transport was closed", maybe_processed=True) from None

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        body: Body | Pieces | None = None,
        headers: Mapping[str, str] | None = None,
        query: Mapping[str, str | int | float | bool] | None = None,
        timeout: float | None = None,
        into: Callable[[int], memoryview] | None = None,
    ) -> TransportResponse:
        """Call the app with one request; same contract as ``HttpTransport.request`` (``into`` unused)."""
        method = method.upper()
        payload, hdrs = _prepare(self._token, json, body, headers)
        target = _target("", path, query)
        url = f"asgi://app{target}"
        status, rheaders, data = self._run(self._call(method, target, payload, hdrs),
                                           DEFAULT_TIMEOUT if timeout is None else timeout, method, url)
        if status >= 400:
            raise error_from_response(method, url, status, rheaders, data)
        return TransportResponse(status, rheaders, data)

    async def _call(self, method: str, target: str, payload: Body | Pieces | None,
                    hdrs: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        raw_path, _, query = target.partition("?")
        scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": method, "scheme": "http", "path": unquote(raw_path),
            "raw_path": raw_path.encode("ascii"),
            "query_string": query.encode("ascii"), "root_path": "",
            "headers": [(b"host", b"app")] + [(k.lower().encode("latin-1"), v.encode("latin-1"))
                                               for k, v in hdrs.items()],
            "client": self._client, "server": ("app", 80), "state": {},
        }
        whole = b"".join(payload) if isinstance(payload, list) else payload
        view = memoryview(whole if whole is not None else b"")
        chunks = [bytes(view[i:i + self._chunk]) for i in range(0, len(view), self._chunk)] or [b""]
        pending = list(reversed(chunks))
        done = asyncio.Event()
        status = 0
        rheaders: dict[str, str] = {}
        body = bytearray()

        async def receive() -> dict[str, Any]:
            if pending:
                chunk = pending.pop()
                return {"type": "http.request", "body": chunk, "more_body": bool(pending)}
            await done.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                rheaders.update({k.decode("latin-1"): v.decode("latin-1") for k, v in message["headers"]})
            elif message["type"] == "http.response.body":
                body.extend(message.get("body", b""))
                if not message.get("more_body", False):
                    done.set()

        try:
            await self._app(scope, receive, send)
        except Exception as exc:  # what uvicorn does: a plain-text 500 if nothing was sent
            if status == 0:
                return 500, {"content-type": "text/plain; charset=utf-8"}, b"Internal Server Error"
            raise TransportError(method, target, f"the app failed mid-response: {exc!r}") from None
        finally:
            done.set()
        if status == 0:
            return 500, {"content-type": "text/plain; charset=utf-8"}, b"Internal Server Error"
        return status, rheaders, bytes(body)

    def close(self) -> None:
        """Run lifespan shutdown and stop the private loop (a ``with_token`` twin does neither)."""
        if self._lifespan is not None:
            self._run(self._lifespan.shutdown(), 30.0, "lifespan", "shutdown")
            self._lifespan = None
        if self._owns_loop and self._loop.is_running():
            # requests still in flight (a long poll whose caller stopped waiting) are cancelled
            # and run to their end first: a task left pending in a closed loop is destroyed
            # with a warning at exit
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(_cancel_pending(), self._loop).result(10.0)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10.0)
            self._loop.close()

    def __enter__(self) -> AsgiTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Lifespan:
    """Drives the app's lifespan protocol (startup, later shutdown) as a server would."""

    def __init__(self, app: Any) -> None:
        self._app = app
        self._to_app: asyncio.Queue[dict[str, Any]] | None = None
        self._from_app: asyncio.Queue[dict[str, Any]] | None = None
        self._task: asyncio.Task[None] | None = None

    async def startup(self) -> None:
        self._to_app, self._from_app = asyncio.Queue(), asyncio.Queue()
        self._task = asyncio.ensure_future(
            self._app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}},
                      self._to_app.get, self._from_app.put))
        await self._step("startup")

    async def shutdown(self) -> None:
        await self._step("shutdown")
        if self._task is not None:
            await self._task

    async def _step(self, phase: str) -> None:
        assert self._to_app is not None and self._from_app is not None
        await self._to_app.put({"type": f"lifespan.{phase}"})
        reply = await self._from_app.get()
        if reply["type"] != f"lifespan.{phase}.complete":
            raise ConfigError(f"the app's lifespan {phase} failed: {reply.get('message', '')}")
