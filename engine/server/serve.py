"""Serving an app with uvicorn: in this thread, in a background thread, or as a process.

The listening socket is bound here, before uvicorn starts, so port 0 works (the
operating system picks a free port and we report it) and a caller knows the
address before the first request. uvicorn runs with our settings and no logging
configuration of its own (``log_config=None``): handlers belong to entry points.

``python -m engine.server.serve --credentials DIR/server --port 0`` runs a server
process; it prints one JSON line ``{"event": "listening", "url": ..., "port": ...}``
on stdout when it accepts connections. ``ServerProcess`` starts one and waits for
that line; ``ServerThread`` does the same inside the current process (tests).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import orjson
import uvicorn

from engine.errors import ConfigError
from engine.provision import DEFAULT_PORT, load_server_credentials
from engine.server.auth import CredentialStore
from engine.server.http import App, Limits

__all__ = ["ServeOptions", "ServerProcess", "ServerThread", "bind_socket", "main", "serve_forever"]

logger = logging.getLogger(__name__)

AppFactory = Callable[..., App]


@dataclass(frozen=True, slots=True)
class ServeOptions:
    """Where and how to listen."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: seconds an idle keep-alive connection stays open (longer than a site's poll gap)
    keep_alive_s: int = 75
    #: the HTTP parser's own ceiling on a request head; the app's limits (431) are lower
    max_request_head: int = 64 << 10
    backlog: int = 2048
    #: answer 503 beyond this many connections or tasks (None: no limit)
    limit_concurrency: int | None = None
    #: seconds to let requests finish on shutdown before cutting them off
    graceful_shutdown_s: int = 10

    @property
    def scheme(self) -> str:
        """``https`` when a certificate is configured."""
        return "https" if self.tls_cert else "http"


def bind_socket(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """Bind and listen on ``host:port`` (port 0: a free port) and return the socket."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must say TCP: asyncio only disables Nagle on sockets that declare it, and
    # with Nagle a response head and body written separately wait for a delayed ACK (40 ms)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


def _url(options: ServeOptions, port: int) -> str:
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(options.host, options.host)
    shown = f"[{host}]" if ":" in host else host
    return f"{options.scheme}://{shown}:{port}"


#: how often a stopping server looks whether its connections have closed
DRAIN_POLL_S = 0.005


class _Server(uvicorn.Server):
    """uvicorn's server, telling us when it accepts connections and stopping without idling.

    uvicorn notices a stop request at its next 0.1 s tick, then waits a fixed 0.1 s after
    asking connections to close and looks every 0.1 s whether they have: a stopped
    ``fedlog server`` took 0.115 s to exit with nothing left to do. Here the stop request
    wakes the serving loop at once and the drain looks every ``DRAIN_POLL_S``, with the
    same order (stop accepting, close idle connections, let open requests finish within
    ``timeout_graceful_shutdown``, then the app's shutdown).
    """

    def __init__(self, config: uvicorn.Config, on_ready: Callable[[], None],
                 on_exit: Callable[[], None] | None = None) -> None:
        super().__init__(config)
        self._on_ready = on_ready
        self._on_exit = on_exit
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self._on_exit is not None and not self.should_exit:
            try:  # a signal handler interrupts the loop's thread: run the hook as a loop callback
                asyncio.get_running_loop().call_soon_threadsafe(self._on_exit)
            except RuntimeError:
                self._on_exit()
        super().handle_exit(sig, frame)
        self._wake_loop()

    def request_exit(self) -> None:
        """Stop gracefully, from any thread (what SIGTERM does)."""
        self.should_exit = True
        self._wake_loop()

    def _wake_loop(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):  # the loop is already closed: nothing to wake
                loop.call_soon_threadsafe(wake.set)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop, self._wake = asyncio.get_running_loop(), asyncio.Event()
        await super().startup(sockets)
        if self.started:
            self._on_ready()

    async def main_loop(self) -> None:
        wake = self._wake
        assert wake is not None  # made in startup
        ticks = 0
        while not await self.on_tick(ticks):
            ticks = (ticks + 1) % 864_000  # on_tick refreshes the Date header every 10 ticks
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), 0.1)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()  # no new connections
        for sock in sockets or []:
            sock.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()  # idle ones close now, busy ones after their response
        try:
            await asyncio.wait_for(self._drained(), timeout=self.config.timeout_graceful_shutdown)
        except TimeoutError:
            logger.error("cancelling %d request(s) still running after the %s s graceful shutdown",
                         len(self.server_state.tasks), self.config.timeout_graceful_shutdown)
            for task in self.server_state.tasks:
                task.cancel(msg="graceful shutdown timed out")
        if not self.force_exit:
            await self.lifespan.shutdown()

    async def _drained(self) -> None:
        while (self.server_state.connections or self.server_state.tasks) and not self.force_exit:
            await asyncio.sleep(DRAIN_POLL_S)
        for server in self.servers:
            await server.wait_closed()


def _config(app: App, options: ServeOptions) -> uvicorn.Config:
    if (options.tls_cert is None) != (options.tls_key is None):
        raise ConfigError("TLS needs both a certificate and its key")
    return uvicorn.Config(
        app, host=options.host, port=options.port, lifespan="on", ws="none",
        log_config=None, access_log=False, proxy_headers=False, server_header=False,
        timeout_keep_alive=options.keep_alive_s, backlog=options.backlog,
        h11_max_incomplete_event_size=options.max_request_head,
        limit_concurrency=options.limit_concurrency,
        timeout_graceful_shutdown=options.graceful_shutdown_s,
        ssl_certfile=options.tls_cert, ssl_keyfile=options.tls_key,
    )


def serve_forever(app: App, options: ServeOptions, on_ready: Callable[[str], None] | None = None,
                  on_exit: Callable[[], None] | None = None) -> None:
    """Serve ``app`` in this thread until SIGINT/SIGTERM (graceful shutdown).

    Args:
        app: the ASGI app.
        options: address, TLS and limits.
        on_ready: called with the server URL once connections are accepted.
        on_exit: called on the serving loop when the stop signal arrives, before open
            requests are drained (to answer long polls at once).
    """
    config = _config(app, options)
    sock = bind_socket(options.host, options.port, options.backlog)
    url = _url(options, sock.getsockname()[1])
    server = _Server(config, lambda: on_ready(url) if on_ready else None, on_exit)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()


class ServerThread:
    """An app served by uvicorn on a background thread (tests, simulations, benchmarks)."""

    def __init__(self, app: App, options: ServeOptions | None = None) -> None:
        self.options = options or ServeOptions(port=0)
        self._app = app
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._server: _Server | None = None
        self.port = 0
        self.url = ""

    def start(self, timeout: float = 10.0) -> ServerThread:
        """Start serving; return once connections are accepted.

        Raises:
            ConfigError: the address is unusable, start-up failed or took over ``timeout``.
        """
        config = _config(self._app, self.options)
        sock = bind_socket(self.options.host, self.options.port, self.options.backlog)
        self.port = sock.getsockname()[1]
        self.url = _url(self.options, self.port)
        self._server = _Server(config, self._ready.set)
        server = self._server

        def run() -> None:
            try:
                asyncio.run(server.serve(sockets=[sock]))
            except BaseException as exc:  # noqa: BLE001 - SystemExit from a failed start-up too
                self._error = exc
            finally:
                sock.close()
                self._ready.set()

        self._thread = threading.Thread(target=run, name=f"fedlog-server-{self.port}", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            self.stop()
            raise ConfigError(f"the server on {self.url} did not start within {timeout} s")
        if self._error is not None or not server.started:
            raise ConfigError(f"the server on {self.url} failed to start: {self._error!r}")
        return self

    @property
    def connections(self) -> int:
        """How many client connections are open now."""
        return len(self._server.server_state.connections) if self._server else 0

    @property
    def total_requests(self) -> int:
        """How many requests have been answered."""
        return self._server.server_state.total_requests if self._server else 0

    def stop(self, timeout: float = 10.0) -> None:
        """Shut down gracefully (force after ``timeout``) and wait for the thread."""
        if self._server is None or self._thread is None:
            return
        self._server.request_exit()
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(timeout)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class ServerProcess:
    """``python -m engine.server.serve ...`` as a child process."""

    def __init__(self, args: Sequence[str], *, env: Mapping[str, str] | None = None,
                 cwd: Path | str | None = None, module: str = "engine.server.serve") -> None:
        self.argv = [sys.executable, "-m", module, *args]
        self._env = dict(env) if env is not None else None
        self._cwd = cwd
        self._stderr: IO[bytes] | None = None
        self._stderr_text = ""
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.port = 0

    @property
    def pid(self) -> int:
        """The child's process id."""
        assert self.process is not None, "not started"
        return self.process.pid

    def start(self, timeout: float = 30.0) -> ServerProcess:
        """Start the child and wait for its ``listening`` line.

        Raises:
            ConfigError: it exited or stayed silent past ``timeout`` (its stderr is quoted).
        """
        return self.launch().wait_ready(timeout)

    def launch(self) -> ServerProcess:
        """Start the child without waiting for it (``wait_ready`` does)."""
        # kept open for the child's lifetime (closed in kill), so not a with-block
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115
        self.process = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=self._stderr,
                                        env=self._env, cwd=self._cwd)
        return self

    def wait_ready(self, timeout: float = 30.0) -> ServerProcess:
        """Wait for the launched child's ``listening`` line (see ``start``)."""
        assert self.process is not None and self.process.stdout is not None, "not launched"
        line = _read_line(self.process.stdout, time.monotonic() + timeout)
        if line is None:
            self.kill()
            raise ConfigError(f"server process did not report readiness: {self.stderr_text()[-2000:]}")
        ready = orjson.loads(line)
        self.url, self.port = ready["url"], ready["port"]
        return self

    def stderr_text(self) -> str:
        """What the child wrote to stderr so far (all of it, once it was stopped)."""
        if self._stderr is None:
            return self._stderr_text
        self._stderr.seek(0)
        return self._stderr.read().decode("utf-8", errors="replace")

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM (graceful), then SIGKILL after ``timeout``; return the exit status."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning("server process %d ignored SIGTERM for %s s; killing it", self.pid, timeout)
        return self.kill()

    def kill(self) -> int:
        """SIGKILL the child and reap it; return its exit status."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.kill()
        status = self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        if self._stderr is not None:
            self._stderr_text = self.stderr_text()
            self._stderr.close()
            self._stderr = None
        return status

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _read_line(stream: IO[bytes], deadline: float) -> bytes | None:
    fd = stream.fileno()
    buf = b""
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                return None
            buf += chunk
    return buf.split(b"\n", 1)[0]


def _load_factory(ref: str) -> AppFactory:
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"--app {ref!r} must look like package.module:function")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"--app {ref!r}: {exc}") from None
    return factory  # type: ignore[no-any-return]


def options_from_args(args: argparse.Namespace) -> ServeOptions:
    """Serving options from parsed flags; TLS files default to the provisioned ones."""
    cert, key = args.tls_cert, args.tls_key
    if cert is None and key is None and not args.no_tls:
        _, _, tls = load_server_credentials(args.credentials)
        base = Path(args.credentials)
        base = base if base.is_dir() else base.parent
        if tls:
            cert, key = base / tls["cert"], base / tls["key"]
    return ServeOptions(host=args.host, port=args.port, tls_cert=Path(cert) if cert else None,
                        tls_key=Path(key) if key else None, keep_alive_s=args.keep_alive)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The serving flags (shared with the ``fedlog server`` command)."""
    parser.add_argument("--credentials", required=True, metavar="DIR",
                        help="the server's provisioned folder (DIR/server from fedlog provision)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (0: pick a free one)")
    parser.add_argument("--tls-cert", type=Path, help="server certificate (default: the provisioned one)")
    parser.add_argument("--tls-key", type=Path, help="server key (default: the provisioned one)")
    parser.add_argument("--no-tls", action="store_true", help="serve plain HTTP even if TLS was provisioned")
    parser.add_argument("--keep-alive", type=int, default=75, help="idle keep-alive seconds (default 75)")
    defaults = Limits()
    parser.add_argument("--max-json-bytes", type=int, default=defaults.max_json_bytes,
                        help=f"largest JSON body (default {defaults.max_json_bytes})")
    parser.add_argument("--max-octet-bytes", type=int, default=defaults.max_octet_bytes,
                        help=f"largest octet-stream body (default {defaults.max_octet_bytes})")


def main(argv: Sequence[str] | None = None) -> int:
    """Run a server process (``python -m engine.server.serve``)."""
    parser = argparse.ArgumentParser(prog="python -m engine.server.serve",
                                     description="Serve a fedlog app until SIGINT or SIGTERM.")
    add_arguments(parser)
    parser.add_argument("--app", default="engine.server.base:create_app",
                        help="factory module:function(store, limits=...) returning the app")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        store = CredentialStore.load(args.credentials)
        limits = Limits(max_json_bytes=args.max_json_bytes, max_octet_bytes=args.max_octet_bytes)
        app = _load_factory(args.app)(store, limits=limits)
        options = options_from_args(args)

        def ready(url: str) -> None:
            port = int(url.rsplit(":", 1)[1])
            line: dict[str, Any] = {"event": "listening", "url": url, "port": port, "pid": os.getpid()}
            sys.stdout.write(orjson.dumps(line).decode() + "\n")
            sys.stdout.flush()

        serve_forever(app, options, ready)
    except ConfigError as exc:
        print(f"fedlog server: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
