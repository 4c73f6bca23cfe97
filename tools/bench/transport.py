"""Benchmark: 1 MiB octet-stream bodies through fedlog's HTTP stack against raw TCP.

Prints one JSON object. Both sides are measured in this run, on loopback, with the
server in a separate process (so client and server do not share a GIL):

* ``http``: uvicorn + fedlog's ASGI ``App`` (bearer-token auth, limits, routing) and
  the ``HttpTransport`` client (stdlib ``http.client``, one kept-alive connection).
  Upload = ``PUT /bench/blob`` with a 1 MiB body, answered with a small JSON ack;
  download = ``GET /bench/blob?size=...`` answered with 1 MiB.
* ``raw_tcp``: the baseline: a thread-per-connection socket server that reads a
  9-byte header (op, length), then reads N bytes into a preallocated buffer and acks
  with one byte (upload), or sends N bytes from a preallocated buffer (download);
  the client uses ``sendall`` and ``recv_into`` likewise.

Figures: ``upload_gbps`` / ``download_gbps`` (10^9 bytes per second, median of the
trials), per-request ``p50_ms``, and ``ratio`` = http / raw_tcp for each direction.

Usage: ``python tools/bench/transport.py [--quick] [--size BYTES] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HEADER = 9  # op (1 byte) + length (8 bytes, big-endian)


def raw_server() -> None:
    """Serve the raw TCP baseline (run in the child process)."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    print(json.dumps({"port": listener.getsockname()[1]}), flush=True)

    def handle(conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = bytearray(64 << 20)
        view = memoryview(buf)
        head = bytearray(HEADER)
        while True:
            if not _recv_exact(conn, memoryview(head)):
                return
            op, size = head[0:1], int.from_bytes(head[1:], "big")
            if op == b"U":
                if not _recv_exact(conn, view[:size]):
                    return
                conn.sendall(b"k")
            else:
                conn.sendall(view[:size])

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


def _recv_exact(conn: socket.socket, view: memoryview) -> bool:
    got = 0
    while got < len(view):
        n = conn.recv_into(view[got:])
        if n == 0:
            return False
        got += n
    return True


def make_bench_app(store: Any, limits: Any = None) -> Any:
    """The HTTP side's app: the base routes plus an upload and a download route."""
    from engine.server.auth import ANY_ROLE
    from engine.server.base import base_router
    from engine.server.http import App, Limits, Request, Response, bytes_response, json_response
    from engine.server.routing import QueryParam, Route

    blobs: dict[int, bytes] = {}

    async def upload(request: Request) -> Response:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
        return json_response({"size": size})

    async def download(request: Request) -> Response:
        size = request.params["size"]
        if size not in blobs:
            blobs[size] = os.urandom(size)
        return bytes_response(blobs[size])

    router = base_router()
    router.add(Route("PUT", "/bench/blob", upload, "upload", roles=ANY_ROLE, body="octet"))
    router.add(Route("GET", "/bench/blob", download, "download", roles=ANY_ROLE,
                     response_type="application/octet-stream",
                     query=(QueryParam("size", "integer", required=True, minimum=0),)))
    return App(router, authenticator=store, limits=limits or Limits(max_octet_bytes=256 << 20))


def http_server(credentials: str) -> None:
    """Serve the HTTP side (run in the child process)."""
    from engine.server.auth import CredentialStore
    from engine.server.serve import ServeOptions, serve_forever

    app = make_bench_app(CredentialStore.load(credentials))
    serve_forever(app, ServeOptions(port=0),
                  lambda url: print(json.dumps({"port": int(url.rsplit(":", 1)[1])}), flush=True))


def spawn(*args: str) -> tuple[subprocess.Popen[str], int]:
    """Start this script in a server mode and return (process, port)."""
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        raise SystemExit(f"server {args} failed to start")
    return proc, json.loads(line)["port"]


def measure(fn: Any, size: int, count: int) -> tuple[float, float]:
    """Run ``fn`` ``count`` times; return (GB/s, p50 ms per request)."""
    for _ in range(3):
        fn()
    times = []
    start = time.perf_counter()
    for _ in range(count):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    total = time.perf_counter() - start
    return size * count / total / 1e9, statistics.median(times) * 1000


def bench_raw(port: int, size: int, count: int, trials: int) -> dict[str, Any]:
    """Upload and download ``size`` bytes ``count`` times per trial over raw TCP."""
    conn = socket.create_connection(("127.0.0.1", port))
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    payload = memoryview(os.urandom(size))
    into = memoryview(bytearray(size))
    ack = bytearray(1)

    def up() -> None:
        conn.sendall(b"U" + size.to_bytes(8, "big"))
        conn.sendall(payload)
        _recv_exact(conn, memoryview(ack))

    def down() -> None:
        conn.sendall(b"D" + size.to_bytes(8, "big"))
        _recv_exact(conn, into)

    result = _trials(up, down, size, count, trials)
    conn.close()
    return result


def bench_http(port: int, token: str, size: int, count: int, trials: int) -> dict[str, Any]:
    """The same transfers through uvicorn + App + HttpTransport."""
    from engine.client.transport import HttpTransport

    client = HttpTransport(f"http://127.0.0.1:{port}", token)
    payload = os.urandom(size)

    def up() -> None:
        client.request("PUT", "/bench/blob", body=payload)

    def down() -> None:
        resp = client.request("GET", "/bench/blob", query={"size": size})
        if len(resp.body) != size:
            raise SystemExit(f"download returned {len(resp.body)} bytes, expected {size}")

    result = _trials(up, down, size, count, trials)
    result["connections_opened"] = client.connections_opened
    client.close()
    return result


def _trials(up: Any, down: Any, size: int, count: int, trials: int) -> dict[str, Any]:
    ups = [measure(up, size, count) for _ in range(trials)]
    downs = [measure(down, size, count) for _ in range(trials)]
    return {
        "upload_gbps": round(statistics.median(u[0] for u in ups), 3),
        "download_gbps": round(statistics.median(d[0] for d in downs), 3),
        "upload_p50_ms": round(statistics.median(u[1] for u in ups), 3),
        "download_p50_ms": round(statistics.median(d[1] for d in downs), 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer requests (well under a minute)")
    parser.add_argument("--size", type=int, default=1 << 20, help="body size in bytes (default 1 MiB)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--serve-raw", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-http", metavar="CREDENTIALS", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_raw:
        raw_server()
        return 0
    if args.serve_http:
        http_server(args.serve_http)
        return 0

    import uvicorn

    from engine.provision import load_identity, provision

    count, trials = (64, 3) if args.quick else (512, 5)
    with tempfile.TemporaryDirectory() as tmp:
        provision(tmp, ["bench-site"])
        token = load_identity(Path(tmp) / "bench-site").token
        raw_proc, raw_port = spawn("--serve-raw")
        http_proc, http_port = spawn("--serve-http", str(Path(tmp) / "server"))
        try:
            raw = bench_raw(raw_port, args.size, count, trials)
            http = bench_http(http_port, token, args.size, count, trials)
        finally:
            for proc in (raw_proc, http_proc):
                proc.kill()
                proc.wait()
    try:
        import httptools  # noqa: F401

        parser_name = "httptools"
    except ImportError:
        parser_name = "h11"
    report = {
        "benchmark": "transport",
        "body_bytes": args.size,
        "requests_per_trial": count,
        "trials": trials,
        "http": http,
        "raw_tcp": raw,
        "ratio": {
            "upload": round(http["upload_gbps"] / raw["upload_gbps"], 3),
            "download": round(http["download_gbps"] / raw["download_gbps"], 3),
        },
        "stack": f"uvicorn {uvicorn.__version__} ({parser_name}) + engine.server.http.App + "
                 "engine.client.transport.HttpTransport (http.client)",
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
