"""Resume with real processes: a receiver SIGKILLed mid-transfer resumes its session and ends bit-exact."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.chunks import LocalChunkStore
from engine.log.sql import open_recorder
from engine.provision import SERVER_DIR, load_identity, provision
from engine.server.serve import ServerProcess
from engine.tensors import load, pack, store

pytestmark = pytest.mark.slow

RECEIVER = """
import json, os, sys
from engine.charts.loader import load_charts
from engine.chunks import LocalChunkStore
from engine.client.transport import HttpTransport
from engine.clock import SystemClock
from engine.log.sql import open_recorder
from engine.machines.runtime import Runtime
from engine.streams import ReceiveSession
url, token, digest, work = sys.argv[1:5]
transport = HttpTransport(url, token)
log = open_recorder(os.path.join(work, "site.db"), lease_holder="receiver")
runtime = Runtime(log, load_charts(), clock=SystemClock(), run_timers=False)
chunks = LocalChunkStore(os.path.join(work, "chunks"))
fetched = []
def fetch(d):
    fetched.append(d)
    return transport.request("GET", f"/v1/chunks/{d}").body
def progress(done, wanted, moved):
    print(json.dumps({"done": done, "wanted": wanted}), flush=True)
_, report = ReceiveSession(runtime, chunks, fetch, "recv:test", in_flight=2, ack_every=4, progress=progress).run(digest)
print(json.dumps({"end": True, "resumed": report.resumed, "wanted": report.chunks_wanted, "fetched": len(fetched)}),
      flush=True)
chunks.close(); runtime.close(); log.close()
"""


def kill_at_then_rerun(argv: list[str], done: int) -> dict[str, Any]:
    """Run the transfer script, SIGKILL it once it reports ``done`` chunks, run it again; its last JSON line."""
    first = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert first.stdout is not None
    for line in first.stdout:
        if json.loads(line).get("done", 0) >= done:
            first.send_signal(signal.SIGKILL)
            break
    first.wait()
    first.stdout.close()
    assert first.returncode == -signal.SIGKILL
    second = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=True)
    result: dict[str, Any] = json.loads(second.stdout.strip().splitlines()[-1])
    return result


def test_a_receiver_killed_at_half_resumes_its_session(tmp_path: Path) -> None:
    provision(tmp_path / "fed", ["site-1"])
    db = tmp_path / "server.db"
    model = {f"t{i}": torch.randn(64 * 1024, generator=torch.Generator().manual_seed(i)) for i in range(8)}
    with LocalChunkStore(f"{db}.chunks") as chunks:
        digest = store(pack(model, chunk_size=64 * 1024), chunks)  # 8 tensors x 4 chunks
    server = ServerProcess(["server", "--credentials", str(tmp_path / "fed" / SERVER_DIR), "--db", str(db),
                            "--port", "0"], module="engine.cli").start(timeout=60)
    work = tmp_path / "receiver"
    work.mkdir()
    argv = [sys.executable, "-c", RECEIVER, server.url, load_identity(tmp_path / "fed" / "admin").token, digest,
            str(work)]
    try:
        end = kill_at_then_rerun(argv, 16)
    finally:
        server.stop()
    assert end["resumed"] is True
    with open_recorder(work / "site.db") as log:
        events = [e for e in log.read(machine_id="recv:test")]
    triggers = [e.trigger for e in events]
    assert triggers.count("create") == 1 and "interrupt" in triggers and "resume" in triggers  # one session
    acked_before = sum(e.data["chunks"] for e in events[:triggers.index("interrupt")] if e.trigger == "ack")
    assert acked_before >= 16 - 2  # what was acknowledged is not fetched again
    assert end["wanted"] <= 32 - acked_before  # arrived-but-unacked chunks were found in the store
    assert end["fetched"] <= 32 - acked_before
    with LocalChunkStore(work / "chunks") as chunks:
        back = load(chunks, digest)
    assert all(torch.equal(back[k], model[k]) for k in model)


SENDER = """
import json, os, sys
from engine.charts.loader import load_charts
from engine.chunks import LocalChunkStore
from engine.client.transport import HttpTransport
from engine.clock import SystemClock
from engine.log.sql import open_recorder
from engine.machines.runtime import Runtime
from engine.streams import SendSession
url, token, digest, work = sys.argv[1:5]
transport = HttpTransport(url, token)
log = open_recorder(os.path.join(work, "site.db"), lease_holder="sender")
runtime = Runtime(log, load_charts(), clock=SystemClock(), run_timers=False)
chunks = LocalChunkStore(os.path.join(work, "chunks"))
put = []
def missing(digests):
    return transport.request("POST", "/v1/chunks/missing", json={"digests": digests}).json()["missing"]
def send(d, data):
    transport.request("PUT", f"/v1/chunks/{d}", body=data)
    put.append(d)
def progress(done, wanted, moved):
    print(json.dumps({"done": done, "wanted": wanted}), flush=True)
report = SendSession(runtime, chunks, missing, send, "send:test", in_flight=2, ack_every=4,
                     progress=progress).run(digest)
print(json.dumps({"end": True, "resumed": report.resumed, "wanted": report.chunks_wanted, "put": len(put)}),
      flush=True)
chunks.close(); runtime.close(); log.close()
"""


def test_a_sender_killed_at_half_resumes_its_session_without_resending_what_arrived(tmp_path: Path) -> None:
    provision(tmp_path / "fed", ["site-1"])
    db = tmp_path / "server.db"
    model = {f"t{i}": torch.randn(64 * 1024, generator=torch.Generator().manual_seed(100 + i)) for i in range(8)}
    work = tmp_path / "sender"
    work.mkdir()
    with LocalChunkStore(work / "chunks") as chunks:
        digest = store(pack(model, chunk_size=64 * 1024), chunks)  # 8 tensors x 4 chunks
    server = ServerProcess(["server", "--credentials", str(tmp_path / "fed" / SERVER_DIR), "--db", str(db),
                            "--port", "0"], module="engine.cli").start(timeout=60)
    argv = [sys.executable, "-c", SENDER, server.url, load_identity(tmp_path / "fed" / "admin").token, digest,
            str(work)]
    try:
        end = kill_at_then_rerun(argv, 16)
    finally:
        server.stop()
    assert end["resumed"] is True
    with open_recorder(work / "site.db") as log:
        events = [e for e in log.read(machine_id="send:test")]
    triggers = [e.trigger for e in events]
    assert triggers.count("create") == 1 and "interrupt" in triggers and "resume" in triggers
    assert triggers[-1] == "complete"
    acked_before = sum(e.data["chunks"] for e in events[:triggers.index("interrupt")] if e.trigger == "ack")
    assert acked_before >= 16 - 2
    # the receiver said what it lacks afresh: acknowledged chunks and those that arrived unacknowledged stay put
    assert end["wanted"] <= 32 - acked_before and end["put"] <= 32 - acked_before + 1  # + the manifest
    with LocalChunkStore(f"{db}.chunks") as chunks:
        back = load(chunks, digest)
    assert all(torch.equal(back[k], model[k]) for k in model)
