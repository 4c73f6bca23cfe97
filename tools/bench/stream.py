"""Benchmark: stream a state_dict from a fedlog server to 4 receiver processes, durably, and resume.

Prints one JSON object. The sender is a ``fedlog server`` process whose chunk store
holds the model (1 MiB tensor-aligned chunks); each receiver is a separate process
running a ``ReceiveSession``: chunks verified and stored in its own pack store,
synced and acknowledged in batches in its own SQLite log (durable receipt), 4
requests in flight over keep-alive HTTP, each fetching ``--batch`` chunks (as a site does),
with the malloc settings of a ``fedlog client`` process (``engine/malloc.py``).

* ``aggregate_gib_s``: 4 x model bytes / the time from the first receiver's session start
  to the last one's end (cold; interpreter start-up excluded, reported separately);
  ``raw_tcp_gib_s``: the same bytes pushed over plain TCP sockets to 4 processes in
  the same run (the baseline); ``over_raw_tcp`` their ratio. Reference loops over the same
  plain TCP, one thread per receiver and no HTTP, show what durable, verified receipt
  costs here: ``tcp_hash_gib_s`` (blake3 of every MiB), ``tcp_hash_write_gib_s`` (blake3,
  written, fsynced every 32 MiB, page cache window: the pack store's work) with
  ``over_tcp_hash_write`` the receivers' ratio to it, and ``tcp_hash_direct_write_gib_s``
  (the same with O_DIRECT writes).
* ``receiver_cpu_s_per_gib`` and ``sender_cpu_s_per_gib``: CPU seconds the receivers (all
  four, their sessions only) and the server spent per GiB of the cold stream, next to
  ``tcp_hash_write_cpu_s_per_gib``, the reference loop's sinks. With every core busy,
  the aggregate rate is at most cores / (receiver + sender CPU per GiB).
* ``unchanged_resend_bytes``: bytes on the wire per receiver when the same model is
  streamed again (only the session; every chunk is already held).
* ``changed10_bytes_ratio``: bytes moved / model bytes when 10% of the tensors changed.
* ``resume_resent_bytes``: a receiver SIGKILLed at 50% and restarted resumes its
  session; bytes fetched twice. ``inflight_bytes_at_kill``: requests in flight x batch x chunk size.
* ``sender_peak_rss_bytes``: the peak RSS (VmHWM) of a server process that streams a
  ``rss_model_bytes`` model (``--rss-mib``, default 4096: the issue's 4 GiB) to 4
  receivers, cold, in a run of its own after the others; target ``rss_model_bytes`` +
  256 MiB. ``--quick`` skips that run and reports the main server's peak over its
  run, next to ``model_bytes`` (``main_sender_peak_rss_bytes`` in both modes).

Usage: ``python tools/bench/stream.py [--quick] [--mib N] [--rss-mib N] [--batch N] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.chunks import LocalChunkStore
from engine.provision import SERVER_DIR, load_identity, provision
from engine.server.serve import ServerProcess
from engine.streams.sessions import DEFAULT_BATCH
from engine.tensors import pack, store

RECEIVERS = 4
IN_FLIGHT = 4
CHUNK = 1 << 20
GIB = 1 << 30

if TYPE_CHECKING:
    import torch


def make_model(mib: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """About ``mib`` MiB of float32 in 20 tensors (torch is imported here: a receiver, like a
    site receiving chunks, never needs it)."""
    import torch

    per = mib * (1 << 20) // 4 // 20
    g = torch.Generator().manual_seed(seed)
    return {f"layer{i}.weight": torch.randn(per, generator=g) for i in range(20)}


# -- the receiver process ---------------------------------------------------------------------


def _cpu_s(pid: int | None = None) -> float:
    """CPU seconds (user + system, all threads) of this process, or of ``pid`` (from /proc)."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def receiver_main(url: str, token: str, digest: str, workdir: str, batch: str) -> int:
    from engine.malloc import tune_malloc
    from engine.startup import importing

    tune_malloc()  # a receiver stands for a site, and ``fedlog client`` processes set these

    with importing():  # as ``fedlog client`` imports its stack
        from engine.charts.loader import load_charts
        from engine.client.api import get_chunks
        from engine.client.transport import HttpTransport
        from engine.clock import SystemClock
        from engine.log.sql import open_recorder
        from engine.machines.runtime import Runtime
        from engine.streams import ReceiveSession

    transport = HttpTransport(url, token, timeout=120)
    os.makedirs(workdir, exist_ok=True)
    log = open_recorder(os.path.join(workdir, "site.db"), lease_holder="bench receiver")
    runtime = Runtime(log, load_charts(), clock=SystemClock(), writer="receiver", run_timers=False)
    chunks = LocalChunkStore(os.path.join(workdir, "chunks"))
    fetched = 0
    lock = threading.Lock()

    def fetch(d: str) -> bytes:
        nonlocal fetched
        data = transport.request("GET", f"/v1/chunks/{d}").body
        with lock:
            fetched += len(data)
        return data

    def fetch_many(ds: list[str], into: Any = None) -> list[memoryview]:
        nonlocal fetched
        datas = get_chunks(transport, ds, into)
        with lock:
            fetched += sum(len(d) for d in datas)
        return datas

    def progress(done: int, wanted: int, moved: int) -> None:
        print(json.dumps({"progress": done, "wanted": wanted}), flush=True)

    started = time.time()
    t0 = time.perf_counter()
    cpu0 = _cpu_s()
    # as a site receives task data: its tensors are filled from the answers, the stored copies only kept
    session = ReceiveSession(runtime, chunks, fetch, f"recv:bench:{digest[:16]}", in_flight=IN_FLIGHT, ack_every=32,
                             progress=progress, fetch_many=fetch_many if int(batch) > 1 else None,
                             batch=int(batch), cache=False)
    _, report = session.run(digest)
    wall = time.perf_counter() - t0
    cpu = _cpu_s() - cpu0
    print(json.dumps({"done": True, "wall_s": wall, "cpu_s": cpu, "fetched": fetched, "wanted": report.chunks_wanted,
                      "resumed": report.resumed, "started": started, "ended": started + wall}), flush=True)
    chunks.close()
    runtime.close()
    log.close()
    transport.close()
    return 0


def run_receivers(url: str, token: str, digest: str, dirs: list[Path], batch: int) -> list[dict[str, Any]]:
    procs = [subprocess.Popen([sys.executable, __file__, "--receiver", url, token, digest, str(d), str(batch)],
                              stdout=subprocess.PIPE, text=True) for d in dirs]
    out = []
    for p in procs:
        text, _ = p.communicate(timeout=900)
        if p.returncode != 0:
            raise SystemExit(f"a receiver failed ({p.returncode})")
        out.append(json.loads(text.strip().splitlines()[-1]))
    return out


# -- raw TCP baseline ----------------------------------------------------------------------------


def tcp_sink_main(port: int, nbytes: int, mode: str = "plain", path: str = "") -> int:
    """Receive ``nbytes`` over plain TCP, 1 MiB at a time; what else is done with each MiB is ``mode``:

    - ``plain``: nothing (the raw TCP baseline);
    - ``hash``: blake3 of each MiB (verified receipt, kept nowhere);
    - ``durable``: blake3, then written to a file, fsynced every 32 MiB, synced bytes dropped
      from the page cache behind 96 MiB (the pack store's work, without its index or HTTP);
    - ``direct``: the same with O_DIRECT writes from a page-aligned buffer (no page cache).

    Each is one thread doing one step after the other, so these are reference points
    for what the work costs here, not bounds: the receivers overlap it on 4 threads.
    """
    import mmap

    from blake3 import blake3

    sock = socket.create_connection(("127.0.0.1", port))
    buf: Any = mmap.mmap(-1, CHUNK) if mode == "direct" else bytearray(CHUNK)
    view = memoryview(buf)
    fd = -1
    if mode in ("durable", "direct"):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if mode == "direct" else 0), 0o600)
    got = records = 0
    while got < nbytes:
        filled = 0
        while filled < CHUNK and got + filled < nbytes:
            n = sock.recv_into(view[filled:])
            if not n:
                break
            filled += n
        if not filled:
            break
        got += filled
        if mode != "plain":
            blake3(view[:filled]).digest()
        if fd < 0:
            continue
        os.write(fd, view if mode == "direct" else view[:filled])  # direct: whole aligned blocks
        records += 1
        if records % 32 == 0:
            os.fsync(fd)
            if mode == "durable" and records > 96:
                os.posix_fadvise(fd, 0, (records - 96) * CHUNK, os.POSIX_FADV_DONTNEED)
    if fd >= 0:
        os.fsync(fd)
        os.close(fd)
        os.unlink(path)
    t = os.times()
    print(got, t.user + t.system, flush=True)
    return 0


def raw_tcp(nbytes: int, mode: str = "plain", work: Path | None = None) -> tuple[float, float]:
    """(aggregate GiB/s, the sinks' CPU seconds per GiB received) of ``nbytes`` pushed to each
    of 4 sink processes (see ``tcp_sink_main``)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]
    payload = memoryview(bytearray(os.urandom(1 << 20)) * 16)  # 16 MiB, sent repeatedly
    procs = [subprocess.Popen([sys.executable, __file__, "--tcp-sink", str(port), str(nbytes), mode,
                               str((work or Path(tempfile.gettempdir())) / f"sink-{i}")],
                              stdout=subprocess.PIPE, text=True) for i in range(RECEIVERS)]
    conns = [server.accept()[0] for _ in range(RECEIVERS)]
    t0 = time.perf_counter()

    def push(conn: socket.socket) -> None:
        sent = 0
        while sent < nbytes:
            n = min(len(payload), nbytes - sent)
            conn.sendall(payload[:n])
            sent += n
        conn.shutdown(socket.SHUT_WR)

    threads = [threading.Thread(target=push, args=(c,)) for c in conns]
    for t in threads:
        t.start()
    cpu = 0.0
    for p in procs:
        out, _ = p.communicate(timeout=600)
        cpu += float(out.split()[1])
    wall = time.perf_counter() - t0
    for t in threads:
        t.join()
    for c in conns:
        c.close()
    server.close()
    return RECEIVERS * nbytes / wall / GIB, cpu / (RECEIVERS * nbytes / GIB)


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def rss_run(mib: int, work: Path, token: str, batch: int) -> dict[str, int]:
    """Stream a ``mib`` MiB model from a fresh server process to 4 fresh receivers; the server's peak RSS."""
    db = work / "rss.db"
    model = make_model(mib, seed=1)
    model_bytes = sum(t.numel() * 4 for t in model.values())
    with LocalChunkStore(f"{db}.chunks") as chunks:
        digest = store(pack(model, chunk_size=CHUNK), chunks)
    del model
    dirs = [work / f"rss{i}" for i in range(RECEIVERS)]
    server = ServerProcess(["server", "--credentials", str(work / "fed" / SERVER_DIR), "--db", str(db),
                            "--port", "0", "--no-tls"], module="engine.cli").start(timeout=60)
    try:
        print(f"[stream] sender RSS: a {mib} MiB model to {RECEIVERS} receivers", file=sys.stderr, flush=True)
        run_receivers(server.url, token, digest, dirs, batch)
        peak = peak_rss(server.pid)
    finally:
        server.stop()
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(f"{db}.chunks", ignore_errors=True)
    return {"rss_model_bytes": model_bytes, "sender_peak_rss_bytes": peak}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 256 MiB model (under a minute)")
    parser.add_argument("--mib", type=int, help="model size in MiB (default 1024; --quick 256)")
    parser.add_argument("--rss-mib", type=int, default=4096,
                        help="model size of the sender-RSS run in MiB (default 4096; --quick skips that run)")
    parser.add_argument("--out")
    parser.add_argument("--batch", type=int, default=DEFAULT_BATCH,
                        help=f"chunks per request (default {DEFAULT_BATCH}; 1: one GET per chunk)")
    parser.add_argument("--receiver", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--tcp-sink", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.receiver:
        return receiver_main(*args.receiver)
    if args.tcp_sink:
        port, nbytes, mode, path = args.tcp_sink
        return tcp_sink_main(int(port), int(nbytes), mode, path)
    mib = args.mib or (256 if args.quick else 1024)
    work = Path(tempfile.mkdtemp(prefix="fedlog-stream-"))
    result: dict[str, Any] = {"bench": "stream", "quick": args.quick, "receivers": RECEIVERS, "in_flight": IN_FLIGHT,
                              "batch": args.batch, "chunk_bytes": CHUNK, "durable_receipt": "pack store synced + acks in a SQLite log"}
    try:
        provision(work / "fed", ["site-1"])
        db = work / "server.db"
        model = make_model(mib)
        changed = dict(model)
        for i in range(0, 20, 10):  # 2 of 20 tensors (10%) change
            changed[f"layer{i}.weight"] = model[f"layer{i}.weight"] + 1
        with LocalChunkStore(f"{db}.chunks") as chunks:
            digest = store(pack(model, chunk_size=CHUNK), chunks)
            digest2 = store(pack(changed, chunk_size=CHUNK), chunks)
        model_bytes = sum(t.numel() * 4 for t in model.values())
        del model, changed
        result["model_bytes"] = model_bytes
        print(f"[stream] raw TCP baseline, {RECEIVERS} x {mib} MiB", file=sys.stderr, flush=True)
        result["raw_tcp_gib_s"], _ = raw_tcp(model_bytes)
        print("[stream] reference loops: TCP + blake3 (+ write + fsync), no HTTP", file=sys.stderr, flush=True)
        result["tcp_hash_gib_s"], _ = raw_tcp(model_bytes, "hash", work)
        result["tcp_hash_write_gib_s"], result["tcp_hash_write_cpu_s_per_gib"] = raw_tcp(model_bytes, "durable", work)
        result["tcp_hash_direct_write_gib_s"], _ = raw_tcp(model_bytes, "direct", work)
        server = ServerProcess(["server", "--credentials", str(work / "fed" / SERVER_DIR), "--db", str(db),
                                "--port", "0", "--no-tls"], module="engine.cli").start(timeout=60)
        token = load_identity(work / "fed" / "admin").token
        try:
            dirs = [work / f"r{i}" for i in range(RECEIVERS)]
            print("[stream] cold stream to 4 receivers", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            sender_cpu0 = _cpu_s(server.pid)
            cold = run_receivers(server.url, token, digest, dirs, args.batch)
            wall = time.perf_counter() - t0
            received_gib = RECEIVERS * model_bytes / GIB
            result["sender_cpu_s_per_gib"] = (_cpu_s(server.pid) - sender_cpu0) / received_gib
            result["receiver_cpu_s_per_gib"] = sum(r["cpu_s"] for r in cold) / received_gib
            # from the first session's start to the last one's end (process start-up excluded)
            window = max(r["ended"] for r in cold) - min(r["started"] for r in cold)
            result["aggregate_gib_s"] = RECEIVERS * model_bytes / window / GIB
            result["aggregate_with_process_startup_gib_s"] = RECEIVERS * model_bytes / wall / GIB
            result["receiver_gib_s"] = [model_bytes / r["wall_s"] / GIB for r in cold]
            result["over_raw_tcp"] = result["aggregate_gib_s"] / result["raw_tcp_gib_s"]
            result["over_tcp_hash_write"] = result["aggregate_gib_s"] / result["tcp_hash_write_gib_s"]
            print("[stream] unchanged resend and 10% changed", file=sys.stderr, flush=True)
            again = run_receivers(server.url, token, digest, dirs, args.batch)
            result["unchanged_resend_bytes"] = max(r["fetched"] for r in again)
            changed10 = run_receivers(server.url, token, digest2, dirs, args.batch)
            result["changed10_bytes_ratio"] = max(r["fetched"] for r in changed10) / model_bytes
            print("[stream] kill a receiver at 50% and resume", file=sys.stderr, flush=True)
            rdir = work / "resume"
            proc = subprocess.Popen([sys.executable, __file__, "--receiver", server.url, token, digest, str(rdir),
                                     str(args.batch)],
                                    stdout=subprocess.PIPE, text=True)
            assert proc.stdout is not None
            for line in proc.stdout:
                entry = json.loads(line)
                if entry.get("progress", 0) >= entry.get("wanted", 1) // 2:
                    proc.send_signal(signal.SIGKILL)
                    break
            proc.wait()
            proc.stdout.close()
            resumed = run_receivers(server.url, token, digest, [rdir], args.batch)[0]
            chunk_count = -(-model_bytes // CHUNK) + 20  # upper bound: per-tensor last chunks
            from engine.log.sql import open_recorder

            with open_recorder(rdir / "site.db") as log:
                acked_first = 0
                for e in log.read():
                    if e.trigger == "ack":
                        acked_first += e.data["chunks"]
                    if e.trigger == "interrupt":
                        break
            fetched_first = acked_first * CHUNK
            total_needed = model_bytes
            # chunks fetched twice = (fetched before the kill + fetched after) - what was needed
            result["resume_resent_bytes"] = max(0, resumed["fetched"] - (total_needed - fetched_first))
            result["resume_acked_chunks_before_kill"] = acked_first
            result["resume_was_resumed"] = resumed["resumed"]
            result["inflight_bytes_at_kill"] = IN_FLIGHT * args.batch * CHUNK
            result["chunk_count_bound"] = chunk_count
            result["main_sender_peak_rss_bytes"] = peak_rss(server.pid)
        finally:
            server.stop()
        if args.quick:
            result.update({"rss_model_bytes": model_bytes, "sender_peak_rss_bytes": result["main_sender_peak_rss_bytes"]})
        else:
            result.update(rss_run(args.rss_mib, work, token, args.batch))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["targets"] = {"aggregate_gib_s": ">= 1.0", "over_raw_tcp": ">= 0.25", "unchanged_resend_bytes": "<= 102400",
                         "changed10_bytes_ratio": "<= 0.11", "resume_resent_bytes": "<= inflight_bytes_at_kill",
                         "sender_peak_rss_bytes": "<= rss_model_bytes + 256 MiB"}
    text = json.dumps(json.loads(json.dumps(result), parse_float=lambda s: round(float(s), 4)), indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
