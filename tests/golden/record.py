"""Re-record the golden logs: ``python -m tests.golden.record`` (from the repository root).

Overwrites ``tests/golden/logs``. Only do this when a log format change is intended
and documented: the golden logs stand for the logs users already have.
"""

from __future__ import annotations

import shutil
import sqlite3
import sys
import tempfile
from pathlib import Path
from typing import Any

from engine.jobs.catalog import CATALOG
from engine.sim import SimOptions, simulate

LOGS = Path(__file__).parent / "logs"


def keep(db: Path, target: Path) -> None:
    """Copy a SQLite log as one self-contained file (WAL folded in)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(db, target)
    wal = Path(f"{db}-wal")
    if wal.exists():
        shutil.copy(wal, Path(f"{target}-wal"))
    with sqlite3.connect(target) as conn:
        conn.execute("PRAGMA journal_mode=DELETE")
    for suffix in ("-wal", "-shm"):
        Path(f"{target}{suffix}").unlink(missing_ok=True)


def run(spec: dict[str, Any], work: Path, **kw: Any) -> dict[str, Any]:
    summary = simulate(SimOptions(spec=spec, clients=2, workdir=work, timeout=300, **kw))
    assert summary["status"] == "finished", summary
    return summary


def fedavg_crash(tmp: Path) -> None:
    spec = dict(CATALOG["linreg"])
    spec["args"] = {**spec["args"], "rounds": 3}
    run(spec, tmp / "a", kill_server_at=["1.aggregate"])
    keep(tmp / "a" / "server.db", LOGS / "fedavg_crash" / "server.db")


def torch_crash(tmp: Path) -> None:
    spec = dict(CATALOG["cnn"])
    spec["args"] = {**spec["args"], "rounds": 2, "epochs": 1}
    run(spec, tmp / "b", kill_server_at=["0.result"])
    keep(tmp / "b" / "server.db", LOGS / "torch_crash" / "server.db")
    target = LOGS / "torch_crash" / "server.db.chunks"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(tmp / "b" / "server.chunks", target)
    (target / "LOCK").unlink(missing_ok=True)
    for index in target.glob("*.db"):
        with sqlite3.connect(index) as conn:  # fold the index's WAL in: one file per database
            conn.execute("PRAGMA journal_mode=DELETE")
        for suffix in ("-wal", "-shm"):
            Path(f"{index}{suffix}").unlink(missing_ok=True)


def nondeterministic(tmp: Path) -> None:
    spec = dict(CATALOG["linreg"])
    spec = {**spec, "workflow": "tests.golden.workflows:stamped_fedavg", "args": {**spec["args"], "rounds": 2}}
    run(spec, tmp / "c")
    keep(tmp / "c" / "server.db", LOGS / "nondeterministic" / "server.db")


def stream_resume(tmp: Path) -> None:
    import torch

    from engine.chunks import LocalChunkStore
    from engine.provision import SERVER_DIR, load_identity, provision
    from engine.server.serve import ServerProcess
    from engine.tensors import pack, store
    from tests.streams.test_resume_processes import RECEIVER, kill_at_then_rerun

    provision(tmp / "fed", ["site-1"])
    db = tmp / "server.db"
    model = {f"t{i}": torch.arange(16 * 1024, dtype=torch.float32) + i for i in range(8)}
    with LocalChunkStore(f"{db}.chunks") as chunks:
        digest = store(pack(model, chunk_size=16 * 1024), chunks)
    server = ServerProcess(["server", "--credentials", str(tmp / "fed" / SERVER_DIR), "--db", str(db),
                            "--port", "0"], module="engine.cli").start(timeout=60)
    work = tmp / "receiver"
    work.mkdir()
    argv = [sys.executable, "-c", RECEIVER, server.url, load_identity(tmp / "fed" / "admin").token, digest, str(work)]
    try:
        kill_at_then_rerun(argv, 16)
    finally:
        server.stop()
    keep(work / "site.db", LOGS / "stream_resume" / "site.db")


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="fedlog-golden-") as tmp:
        for record in (fedavg_crash, torch_crash, nondeterministic, stream_resume):
            folder = Path(tmp) / record.__name__
            folder.mkdir()
            record(folder)
            print(f"recorded {record.__name__}", file=sys.stderr)


if __name__ == "__main__":
    main()
