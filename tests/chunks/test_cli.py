"""``fedlog chunks``: gc keeps every chunk a recorded round needs and drops the rest; verify finds corruption."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.chunks import LocalChunkStore, hash_bytes
from engine.jobs.catalog import CATALOG
from engine.log.sql import open_recorder
from engine.sim import SimOptions, simulate
from engine.tensors import load, refs_in

pytestmark = pytest.mark.slow


def fedlog(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], capture_output=True, text=True, timeout=120)


def test_gc_keeps_what_the_log_references(tmp_path: Path) -> None:
    job = dict(CATALOG["cnn"])
    job["args"] = {**job["args"], "rounds": 2, "epochs": 1}
    summary = simulate(SimOptions(spec=job, clients=2, workdir=tmp_path / "sim", timeout=120))
    assert summary["status"] == "finished"
    db, chunks = tmp_path / "sim" / "server.db", tmp_path / "sim" / "server.chunks"
    with LocalChunkStore(chunks) as store:
        junk = b"not referenced by anything" * 1000
        store.put(hash_bytes(junk), junk)
        store.sync()
        before = store.stats()["chunks"]
    dry = json.loads(fedlog("chunks", "--json", "gc", str(chunks), "--db", str(db), "--dry-run").stdout)
    assert dry["garbage"] == 1 and dry["missing_manifests"] == []
    done = json.loads(fedlog("chunks", "--json", "gc", str(chunks), "--db", str(db)).stdout)
    assert done["deleted"] == 1
    with open_recorder(db) as log:
        manifests = {d for e in log.read() for d in refs_in(e.data)}
    with LocalChunkStore(chunks) as store:
        assert store.stats()["chunks"] == before - 1
        assert store.missing([hash_bytes(junk)]) == [hash_bytes(junk)]
        for digest in manifests:  # every recorded model and update can still be rebuilt
            load(store, digest)
    stats = json.loads(fedlog("chunks", "--json", "stats", str(chunks)).stdout)
    assert stats["chunks"] == before - 1
    ok = fedlog("chunks", "verify", str(chunks))
    assert ok.returncode == 0, ok.stderr
    bad = fedlog("chunks", "stats", str(tmp_path))
    assert bad.returncode == 2 and "is not a chunk store" in bad.stderr
