"""HttpTransport's connection handling against uvicorn and against scripted raw servers."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from engine.client.errors import RemoteError, TransportError
from engine.client.transport import HttpTransport
from engine.errors import ConfigError
from engine.server.http import App
from engine.server.serve import ServeOptions, ServerThread
from tests.server.support import Federation, SampleState


class PeerLog:
    """ASGI wrapper recording which client (address, port) sent each request."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.peers: list[tuple[str, int]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.peers.append(tuple(scope["client"]))  # type: ignore[arg-type]
        await self.app(scope, receive, send)


@pytest.fixture
def served(sample: tuple[App, SampleState]) -> Iterator[tuple[ServerThread, PeerLog]]:
    peers = PeerLog(sample[0])
    server = ServerThread(peers, ServeOptions(port=0, keep_alive_s=1)).start()  # type: ignore[arg-type]
    try:
        yield server, peers
    finally:
        server.stop()


def wait_for(condition: Callable[[], bool], what: str, deadline_s: float = 10.0) -> None:
    """Wait for a real condition (not for time to pass); fail after the deadline."""
    end = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > end:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def test_requests_share_one_kept_alive_connection(served: tuple[ServerThread, PeerLog],
                                                  federation: Federation) -> None:
    server, peers = served
    with HttpTransport(server.url, federation.tokens["site-1"]) as client:
        client.request("GET", "/v1/whoami")
        sock = client._local.conn.sock
        for i in range(5):
            client.request("POST", "/v1/echo", json={"name": f"n{i}"})
            client.request("PUT", "/v1/blobs/b", body=b"x" * 5000)
            client.request("GET", "/v1/blobs/b")
        assert client._local.conn.sock is sock
        assert client.connections_opened == 1
        assert server.connections == 1
    assert len(peers.peers) == 16 and len(set(peers.peers)) == 1


def test_error_answers_keep_the_connection(served: tuple[ServerThread, PeerLog],
                                           federation: Federation) -> None:
    server, peers = served
    with HttpTransport(server.url, federation.tokens["site-1"]) as client:
        for path, kwargs in [("/v1/nowhere", {}), ("/v1/admin/stats", {}),
                             ("/v1/blobs/big", {"body": b"z" * 9000})]:
            method = "PUT" if "body" in kwargs else "GET"
            with pytest.raises(RemoteError):
                client.request(method, path, **kwargs)
        client.request("GET", "/v1/whoami")
        assert client.connections_opened == 1
    assert len(set(peers.peers)) == 1


def test_each_thread_has_its_own_connection(served: tuple[ServerThread, PeerLog],
                                            federation: Federation) -> None:
    server, peers = served
    client = HttpTransport(server.url, federation.tokens["site-2"])
    barrier = threading.Barrier(3)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(3):
                client.request("GET", "/v1/whoami")
            barrier.wait(10)  # hold the connection until every thread has one
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    client.close()
    assert not errors
    assert client.connections_opened == 3
    assert len(set(peers.peers)) == 3 and len(peers.peers) == 9


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_reconnects_after_the_server_closed_an_idle_connection(
        served: tuple[ServerThread, PeerLog], federation: Federation, method: str) -> None:
    server, peers = served
    with HttpTransport(server.url, federation.tokens["site-1"]) as client:
        client.request("GET", "/v1/whoami")
        wait_for(lambda: server.connections == 0, "the server's keep-alive timeout to close the connection")
        if method == "GET":
            assert client.request("GET", "/v1/whoami").json()["name"] == "site-1"
        else:
            assert client.request("POST", "/v1/echo", json={"name": "a"}).json()["got"] == {"name": "a"}
        assert client.connections_opened == 2
    assert len(set(peers.peers)) == 2


class ScriptedServer:
    """A raw socket server: answers ``answered`` requests on the first connection, then
    reads the next request and closes without answering (a server that crashed or
    dropped a kept-alive connection just as the request arrived)."""

    RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n"
                b"\r\n{\"ok\":true}")

    def __init__(self, answered: int, response: bytes = RESPONSE) -> None:
        self.answered = answered
        self.response = response
        self.requests: list[tuple[int, bytes]] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.stop = False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        conn_no = 0
        while not self.stop:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            conn_no += 1
            with conn:
                served = 0
                while True:
                    head = self._read_request(conn)
                    if head is None:
                        break
                    self.requests.append((conn_no, head.split(b"\r\n", 1)[0]))
                    if conn_no == 1 and served >= self.answered:
                        break  # close without answering
                    conn.sendall(self.response)
                    served += 1
                    if b"Connection: close" in self.response:
                        break

    @staticmethod
    def _read_request(conn: socket.socket) -> bytes | None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return None
            data += chunk
        head, rest = data.split(b"\r\n\r\n", 1)
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(rest) < length:
            rest += conn.recv(65536)
        return head

    def close(self) -> None:
        self.stop = True
        self.listener.close()


@pytest.fixture
def scripted() -> Iterator[Callable[..., ScriptedServer]]:
    made: list[ScriptedServer] = []

    def make(answered: int, **kwargs: Any) -> ScriptedServer:
        server = ScriptedServer(answered, **kwargs)
        made.append(server)
        return server

    yield make
    for server in made:
        server.close()


def test_idempotent_request_is_retried_once_on_a_broken_reused_connection(
        scripted: Callable[..., ScriptedServer]) -> None:
    server = scripted(1)
    with HttpTransport(f"http://127.0.0.1:{server.port}", "t") as client:
        client.request("GET", "/a")
        assert client.request("GET", "/b").json() == {"ok": True}
    assert server.requests == [(1, b"GET /a HTTP/1.1"), (1, b"GET /b HTTP/1.1"), (2, b"GET /b HTTP/1.1")]


def test_non_idempotent_request_is_never_retried(scripted: Callable[..., ScriptedServer]) -> None:
    server = scripted(1)
    with HttpTransport(f"http://127.0.0.1:{server.port}", "t") as client:
        client.request("GET", "/a")
        with pytest.raises(TransportError) as err:
            client.request("POST", "/submit", json={"result": 1})
        assert err.value.maybe_processed
        assert "connection lost" in err.value.reason
        # the next request opens a fresh connection and works
        assert client.request("POST", "/again", json={}).json() == {"ok": True}
    assert server.requests == [(1, b"GET /a HTTP/1.1"), (1, b"POST /submit HTTP/1.1"),
                               (2, b"POST /again HTTP/1.1")]


def test_fresh_connection_failure_is_not_retried(scripted: Callable[..., ScriptedServer]) -> None:
    server = scripted(0)
    with HttpTransport(f"http://127.0.0.1:{server.port}", "t") as client, \
            pytest.raises(TransportError) as err:
        client.request("GET", "/a")
    assert not err.value.maybe_processed
    assert server.requests == [(1, b"GET /a HTTP/1.1")]


def test_timeout_is_a_transport_error() -> None:
    listener = socket.create_server(("127.0.0.1", 0))  # accepts (backlog) but never answers
    try:
        with HttpTransport(f"http://127.0.0.1:{listener.getsockname()[1]}", "t") as client, \
                pytest.raises(TransportError) as err:
            client.request("POST", "/slow", json={}, timeout=0.2)
        assert "timed out" in err.value.reason
        assert err.value.maybe_processed
    finally:
        listener.close()


def test_connection_refused() -> None:
    probe = socket.create_server(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    with HttpTransport(f"http://127.0.0.1:{port}", "t") as client, pytest.raises(TransportError) as err:
        client.request("GET", "/v1/health")
    assert "connection refused" in err.value.reason
    assert not err.value.maybe_processed


def test_huge_request_head_is_431(served: tuple[ServerThread, PeerLog], federation: Federation) -> None:
    server, _ = served
    with HttpTransport(server.url, federation.tokens["site-1"]) as client:
        with pytest.raises(RemoteError) as err:
            client.request("GET", "/v1/whoami", headers={"X-Huge": "h" * (70 << 10)})
        assert (err.value.status, err.value.code) == (431, "headers_too_large")
        assert client.request("GET", "/v1/whoami").status == 200


def test_non_json_error_answer(scripted: Callable[..., ScriptedServer]) -> None:
    page = b"<html><body>upstream is down</body></html>"
    server = scripted(5, response=(b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/html\r\n"
                                   b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(page), page)))
    with HttpTransport(f"http://127.0.0.1:{server.port}", "t") as client:
        for _ in range(2):
            with pytest.raises(RemoteError) as err:
                client.request("GET", "/v1/health")
            assert (err.value.status, err.value.code) == (502, "http_502")
            assert err.value.message == page.decode()
        # "Connection: close" was honoured: the second request used a new connection
        assert client.connections_opened == 2


def test_base_url_path_prefix_is_kept(served: tuple[ServerThread, PeerLog], federation: Federation) -> None:
    server, _ = served
    with HttpTransport(server.url + "/fedlog/", federation.tokens["site-1"]) as client, \
            pytest.raises(RemoteError) as err:
        client.request("GET", "/v1/health")
    assert err.value.message == "no route /fedlog/v1/health"
    assert err.value.url == server.url + "/fedlog/v1/health"


@pytest.mark.parametrize("url", ["ftp://h:1", "127.0.0.1:8700", "http://:80", "http://h:99999"])
def test_bad_base_url(url: str) -> None:
    with pytest.raises(ConfigError):
        HttpTransport(url, "t")


def test_ca_for_plain_http_is_refused() -> None:
    with pytest.raises(ConfigError, match="not https"):
        HttpTransport("http://127.0.0.1:1", "t", tls_ca="ca.pem")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"path": "v1/health"}, "must start with '/'"),
    ({"path": "/v1/a b"}, "percent-encoded"),
    ({"path": "/v1/é"}, "percent-encoded"),
    ({"path": "/v1/x", "json": {}, "body": b""}, "not both"),
    ({"path": "/v1/x", "headers": {"X-Bad": "a\r\nInjected: yes"}}, "not a valid HTTP header"),
    ({"path": "/v1/x", "headers": {"Bad Name": "v"}}, "not a valid HTTP header"),
    ({"path": "/v1/x", "headers": {"X-Euro": "€"}}, "not a valid HTTP header"),
])
def test_bad_requests_are_refused_before_sending(kwargs: dict[str, Any], message: str) -> None:
    client = HttpTransport("http://127.0.0.1:1", "t")
    with pytest.raises(ConfigError, match=message):
        client.request("POST", **kwargs)
    assert client.connections_opened == 0


def test_token_with_header_breaking_characters_is_refused() -> None:
    with pytest.raises(ConfigError, match="token"):
        HttpTransport("http://127.0.0.1:1", "tok\nen").request("GET", "/v1/health")


def test_closed_transport_refuses(served: tuple[ServerThread, PeerLog]) -> None:
    client = HttpTransport(served[0].url, None)
    client.request("GET", "/v1/health")
    client.close()
    with pytest.raises(ConfigError, match="closed"):
        client.request("GET", "/v1/health")


def test_a_body_is_read_into_the_buffer_the_caller_gives(scripted: Callable[..., ScriptedServer]) -> None:
    import mmap

    body = bytes(range(256)) * 40
    server = scripted(5, response=(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                                   b"Content-Length: %d\r\n\r\n%s" % (len(body), body)))
    buffer = mmap.mmap(-1, 1 << 16)
    asked: list[int] = []

    def into(n: int) -> memoryview:
        asked.append(n)
        return memoryview(buffer)[:n]

    with HttpTransport(f"http://127.0.0.1:{server.port}", "t") as client:
        resp = client.request("GET", "/v1/chunks/x", into=into)
        assert asked == [len(body)] and isinstance(resp.body, memoryview) and resp.body == body
        assert buffer[:len(body)] == body  # where the bytes went
        again = client.request("GET", "/v1/chunks/x")  # same connection, kept alive; bytes without ``into``
        assert again.body == body and client.connections_opened == 1


def test_an_error_answer_is_never_read_into_the_callers_buffer(scripted: Callable[..., ScriptedServer]) -> None:
    page = b'{"error": {"code": "not_found", "message": "no such chunk"}}'
    server = scripted(5, response=(b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\n"
                                   b"Content-Length: %d\r\n\r\n%s" % (len(page), page)))
    with HttpTransport(f"http://127.0.0.1:{server.port}", "t") as client, pytest.raises(RemoteError) as err:
        client.request("GET", "/v1/chunks/x", into=lambda n: pytest.fail("asked for a buffer"))  # type: ignore[arg-type,return-value]
    assert err.value.status == 404 and err.value.message == "no such chunk"


def test_a_body_cut_short_is_a_transport_error(scripted: Callable[..., ScriptedServer]) -> None:
    server = scripted(5, response=(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                                   b"Connection: close\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10))
    with HttpTransport(f"http://127.0.0.1:{server.port}", "t") as client, pytest.raises(TransportError):
        client.request("POST", "/v1/chunks/fetch", json={}, into=lambda n: memoryview(bytearray(n)))
