"""Serving for real: a background thread, a child process, TLS."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import threading
import time
from importlib.util import find_spec
from pathlib import Path

import pytest

from engine.client.errors import AuthError, RemoteError, TransportError
from engine.client.transport import HttpTransport
from engine.errors import ConfigError
from engine.provision import load_identity, provision
from engine.server.auth import CredentialStore
from engine.server.base import create_app
from engine.server.http import App
from engine.server.serve import ServeOptions, ServerProcess, ServerThread, bind_socket
from tests.server.support import Federation, SampleState

REPO = Path(__file__).resolve().parents[2]

needs_tls_tool = pytest.mark.skipif(shutil.which("openssl") is None and find_spec("cryptography") is None,
                                    reason="neither openssl nor cryptography is available")


def refused(port: int) -> bool:
    """True once nothing accepts connections on ``port``.

    A connection made while the listening socket closes is reset instead of refused: it
    was queued for a listener that will never accept it, so that counts too.
    """
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except (ConnectionRefusedError, ConnectionResetError):
        return True
    return False


def test_port_zero_picks_a_free_port_and_stop_releases_it(sample: tuple[App, SampleState]) -> None:
    first = ServerThread(sample[0]).start()
    second = ServerThread(sample[0]).start()
    try:
        assert first.port and second.port and first.port != second.port
        assert first.url == f"http://127.0.0.1:{first.port}"
        with HttpTransport(second.url, None) as client:
            assert client.request("GET", "/v1/health").json()["status"] == "ok"
    finally:
        first.stop()
        second.stop()
    assert refused(first.port) and refused(second.port)


def test_busy_port_is_a_config_error(sample: tuple[App, SampleState]) -> None:
    holder = bind_socket("127.0.0.1", 0)
    try:
        with pytest.raises(ConfigError, match="cannot listen"):
            ServerThread(sample[0], ServeOptions(port=holder.getsockname()[1])).start()
    finally:
        holder.close()


def test_tls_needs_certificate_and_key(sample: tuple[App, SampleState], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="both"):
        ServerThread(sample[0], ServeOptions(port=0, tls_cert=tmp_path / "c.pem")).start()


def server_process(credentials: Path, *extra: str) -> ServerProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return ServerProcess(["--credentials", str(credentials), "--port", "0", *extra], env=env, cwd=REPO)


def test_end_to_end_with_a_server_process(federation: Federation) -> None:
    proc = server_process(federation.root / "server", "--app", "tests.server.support:create_app").start()
    try:
        assert proc.url == f"http://127.0.0.1:{proc.port}"
        site = HttpTransport(proc.url, federation.tokens["site-1"])
        assert site.request("GET", "/v1/whoami").json() == {"name": "site-1", "role": "site"}
        assert site.request("POST", "/v1/echo", json={"name": "e2e"}).json()["got"] == {"name": "e2e"}
        data = os.urandom(8192)
        assert site.request("PUT", "/v1/blobs/w", body=data).json()["size"] == 8192
        assert site.request("GET", "/v1/blobs/w").body == data
        with pytest.raises(AuthError) as err:
            site.request("GET", "/v1/admin/stats")
        assert err.value.status == 403
        with pytest.raises(RemoteError) as err413:
            site.request("PUT", "/v1/blobs/big", body=os.urandom(8193))
        assert err413.value.status == 413
        assert site.connections_opened == 1
        admin = HttpTransport(proc.url, federation.tokens["admin"])
        assert admin.request("GET", "/v1/admin/stats").json()["handled"] == {
            "echo": 1, "put_blob": 1, "get_blob": 1, "admin_stats": 1}
        with HttpTransport(proc.url, federation.tokens["site-1"] + "x") as forged, \
                pytest.raises(AuthError) as err:
            forged.request("GET", "/v1/whoami")
        assert err.value.status == 401
        site.close()
        admin.close()
    finally:
        status = proc.stop()
    # uvicorn shuts down gracefully, then lets SIGTERM end the process as usual
    assert status == -signal.SIGTERM, proc.stderr_text()
    assert "Traceback" not in proc.stderr_text()


def test_killed_server_process_is_a_transport_error(federation: Federation) -> None:
    proc = server_process(federation.root / "server").start()
    client = HttpTransport(proc.url, federation.tokens["site-2"])
    try:
        assert client.request("GET", "/v1/whoami").json()["name"] == "site-2"
        assert proc.kill() == -signal.SIGKILL
        with pytest.raises(TransportError) as err:
            client.request("POST", "/v1/whoami")
        assert not err.value.maybe_processed
    finally:
        client.close()
        proc.kill()


def test_server_process_reports_start_up_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such credentials file"):
        server_process(tmp_path / "missing").start()


@needs_tls_tool
def test_tls_end_to_end(tmp_path: Path) -> None:
    root = tmp_path / "fed"
    provision(root, ["site-1"], server_url="https://127.0.0.1:8700", tls=True)
    ident = load_identity(root / "site-1")
    proc = server_process(root / "server").start()  # the provisioned certificate is used by default
    try:
        assert proc.url.startswith("https://127.0.0.1:")
        with HttpTransport(proc.url, ident.token, tls_ca=ident.ca_cert) as client:
            assert client.request("GET", "/v1/whoami").json()["name"] == "site-1"
            assert client.connections_opened == 1
        with HttpTransport(proc.url, ident.token) as untrusting, pytest.raises(TransportError) as err:
            untrusting.request("GET", "/v1/whoami")
        assert "TLS failure" in err.value.reason
        with HttpTransport(proc.url.replace("https", "http"), ident.token) as plain, \
                pytest.raises((TransportError, RemoteError)):
            plain.request("GET", "/v1/whoami")
    finally:
        proc.stop()


@needs_tls_tool
def test_tls_in_a_thread_and_no_tls_override(tmp_path: Path) -> None:
    root = tmp_path / "fed"
    provision(root, ["site-1"], server_url="https://localhost:8700", tls=True)
    ident = load_identity(root / "site-1")
    tls = root / "server" / "tls"
    app = create_app(CredentialStore.load(root / "server"))
    with ServerThread(app, ServeOptions(host="127.0.0.1", port=0, tls_cert=tls / "server.pem",
                                        tls_key=tls / "server.key")) as server:
        url = server.url.replace("127.0.0.1", "localhost")  # the certificate names localhost too
        with HttpTransport(url, ident.token, tls_ca=ident.ca_cert) as client:
            assert client.request("GET", "/v1/whoami").json()["name"] == "site-1"
    proc = server_process(root / "server", "--no-tls").start()
    try:
        assert proc.url.startswith("http://")
        with HttpTransport(proc.url, ident.token) as client:
            assert client.request("GET", "/v1/whoami").json()["name"] == "site-1"
    finally:
        proc.stop()


def test_a_stopping_server_finishes_the_request_in_progress_and_closes_idle_connections(
        sample: tuple[App, SampleState], federation: Federation) -> None:
    """Stopping is graceful: no new connections, idle keep-alive ones closed, a request whose
    body is still arriving is served to the end, and only then does the server exit."""
    app, state = sample
    server = ServerThread(app).start()
    idle = HttpTransport(server.url, federation.tokens["site-2"])
    busy = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    stopper = threading.Thread(target=server.stop)
    try:
        assert idle.request("GET", "/v1/whoami").json()["name"] == "site-2"  # now an idle keep-alive connection
        body = os.urandom(4096)
        busy.sendall(f"POST /v1/blobs/b/stream HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {federation.tokens['site-1']}"
                     f"\r\nContent-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                     + body[:1000])
        while server.connections < 2:  # the server has both connections before it is told to stop
            time.sleep(0.001)
        stopper.start()
        while not refused(server.port):  # stopping: it accepts no new connection
            time.sleep(0.001)
        while server.connections > 1:  # the idle connection is closed; the busy one is not
            time.sleep(0.001)
        assert stopper.is_alive()
        busy.sendall(body[1000:])
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
            piece = busy.recv(65536)
            assert piece, f"the connection closed before the response was complete: {answer!r}"
            answer += piece
        assert answer.startswith(b"HTTP/1.1 200")
        assert b'"size":4096' in answer.replace(b" ", b"")
        stopper.join(10)
        assert not stopper.is_alive()
        assert state.handled["stream_blob"] == 1
    finally:
        busy.close()
        idle.close()
        server.stop()
