"""Run a payload-building or payload-reading function in a child process, so the server stays torch-free.

The server aggregates with numpy (``load_tensors(..., arrays=True)``), but making the
initial model or scoring the final one calls user functions that need torch, and a
process that imports torch keeps ~250 MB more resident for the rest of its life. When
torch is not loaded here, such a call runs in ``python -m engine.workflows.isolated``:
payloads cross as a folder holding the manifest and its chunks (verified by address
when they come back), results as JSON. When torch is already loaded (tests, an
in-process server) the function runs here, with the same result: a payload's address
depends only on its bytes.

A fresh child pays for importing torch (~1 s of CPU) on the job's critical path.
``warm.prewarm(modules)`` (``fedlog server --preload MODULE``; the import-light
``engine.workflows.warm``) starts one child at once that imports the modules and
waits: the next isolated call runs there, then it exits, so no torch process outlives
the call it served.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from engine.chunks import ChunkStore
from engine.client.executor import load_callable
from engine.errors import EngineError
from engine.startup import importing
from engine.tensors import Manifest, pack, unpack
from engine.tensors import store as store_packed
from engine.workflows import warm

__all__ = ["call_on_payload", "make_payload"]

#: set to 0 to run such functions in this process even when torch is not loaded
ENV = "FEDLOG_ISOLATE_TORCH"


def _isolate(asked: bool | None) -> bool:
    if asked is not None:
        return asked
    return "torch" not in sys.modules and os.environ.get(ENV, "1") != "0"


def _write(folder: Path, manifest: Manifest, get_chunk: Any) -> None:
    (folder / "manifest").write_bytes(manifest.to_bytes())
    with open(folder / "chunks", "wb") as out:
        for digest in dict.fromkeys(manifest.chunk_digests()):
            out.write(get_chunk(digest))


def _read(folder: Path) -> tuple[Manifest, dict[str, memoryview]]:
    manifest = Manifest.from_bytes((folder / "manifest").read_bytes())
    data = memoryview((folder / "chunks").read_bytes())  # chunks are views of it, not copies
    chunks, offset = {}, 0
    lengths = {d: length for spec in manifest.tensors for d, _, length in spec.chunk_lengths()}
    for digest in dict.fromkeys(manifest.chunk_digests()):
        chunks[digest] = data[offset:offset + lengths[digest]]
        offset += lengths[digest]
    return manifest, chunks


def _exchange_dir() -> str | None:
    """Where payloads cross: shared memory where the machine has it (a model-sized file in
    it costs no disk page cache, whose fresh pages were ~10x slower to fill here), else the
    default temporary directory."""
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK) else None


def _run(args: list[str], what: str) -> None:
    child = warm.take()
    if child is not None:
        try:
            out, err = child.communicate(json.dumps(args) + "\n")
            code = child.returncode
        except BrokenPipeError:
            child.kill()
            child.communicate()
            child = None
    if child is None:
        done = subprocess.run([*warm.CHILD, *args], capture_output=True, text=True, check=False)
        out, err, code = done.stdout, done.stderr, done.returncode
    if code != 0:
        tail = (err or out).strip().splitlines()[-5:]
        raise EngineError(f"{what} failed in its child process (exit {code}): " + " | ".join(tail))


def make_payload(fn: str, kwargs: dict[str, Any], store: ChunkStore, *, isolate: bool | None = None) -> str:
    """Store ``fn(**kwargs)`` (a payload holding tensors) in ``store``; return its manifest address.

    ``isolate``: run ``fn`` in a child process (None: when torch is not loaded here).
    """
    if not _isolate(isolate):
        return store_packed(pack(load_callable(fn, "model")(**kwargs)), store)
    with tempfile.TemporaryDirectory(prefix="fedlog-isolated-", dir=_exchange_dir()) as tmp:
        _run(["make", fn, json.dumps(kwargs), tmp], f"{fn}(**{kwargs!r})")
        manifest, chunks = _read(Path(tmp))
    for digest in store.missing(list(chunks)):
        store.put(digest, chunks[digest])  # verified against the address
    manifest_bytes = manifest.to_bytes()
    store.put(manifest.digest, manifest_bytes)
    store.sync()
    return manifest.digest


def call_on_payload(fn: str, digest: str, store: ChunkStore, *, isolate: bool | None = None) -> Any:
    """JSON ``fn(payload)`` for the payload stored under ``digest`` (``isolate`` as for ``make_payload``)."""
    manifest = Manifest.from_bytes(store.get(digest))
    if not _isolate(isolate):
        return load_callable(fn, "function")(unpack(manifest, read_into=store.read_into))
    with tempfile.TemporaryDirectory(prefix="fedlog-isolated-", dir=_exchange_dir()) as tmp:
        _write(Path(tmp), manifest, store.get)
        _run(["call", fn, tmp], f"{fn}(payload {digest[:16]})")
        return json.loads((Path(tmp) / "result.json").read_text())


def main(argv: list[str]) -> None:
    """The child: ``make FN KWARGS_JSON DIR`` or ``call FN DIR``; ``serve MODULE...`` imports the
    modules, then reads one such command (a JSON list) from stdin and runs it (EOF: exits)."""
    if argv[0] == "serve":
        with importing():
            for module in argv[1:]:
                with contextlib.suppress(Exception):  # the call itself reports a module that fails to import
                    importlib.import_module(module)
        line = sys.stdin.readline()
        if not line.strip():
            return
        argv = json.loads(line)
    if argv[0] == "make":
        fn, kwargs, folder = argv[1], json.loads(argv[2]), Path(argv[3])
        with importing():
            make = load_callable(fn, "model")
        packed = pack(make(**kwargs))
        _write(folder, packed.manifest, lambda d: packed.chunks[d])
    else:
        fn, folder = argv[1], Path(argv[2])
        manifest, chunks = _read(folder)
        with importing():
            call = load_callable(fn, "function")
        result = call(unpack(manifest, chunks.__getitem__))
        (folder / "result.json").write_text(json.dumps(result))


def _exit_at_once() -> None:
    """End the child without the interpreter's finalization, once its work is on disk.

    Finalizing a process that imported torch took 0.1–0.5 s here, and the server
    waits for the child to end before it reads the payload: that wait was on the job's
    critical path (the first round starts after the initial model is stored). Everything
    the child writes is closed by then; only the standard streams need a flush.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
    _exit_at_once()
