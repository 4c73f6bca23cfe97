"""``fedlog chunks stats|verify|gc``: look after a chunk store.

``gc`` keeps every chunk reachable from the log: each tensor reference in any event
(``{"$tensors": manifest}`` in task data, results, published values, checkpoints),
the manifest it names and every chunk that manifest lists. Everything else is
deleted and mostly-garbage pack files are rewritten. So every recorded round can
still be replayed from its exact tensors.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import orjson

from engine.chunks import LocalChunkStore
from engine.errors import ChunkError, ConfigError, ManifestError
from engine.log.recorder import EventRecorder
from engine.log.sql import open_recorder
from engine.tensors import Manifest, refs_in

__all__ = ["cmd_chunks", "reachable", "register"]


def register(sub: Any) -> None:
    """Add the ``chunks`` command."""
    parser = sub.add_parser("chunks", help="statistics, verification and garbage collection of a chunk store")
    parser.add_argument("--json", action="store_true", help="print the outcome as JSON")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, text in (("stats", "chunks, bytes and pack files"),
                       ("verify", "re-hash every chunk; drop corrupt copies (exit 1 if any)")):
        sp = actions.add_parser(name, help=text)
        sp.add_argument("store", type=Path, metavar="DIR", help="the chunk store (e.g. fedlog-server.db.chunks)")
    gc = actions.add_parser("gc", help="delete chunks no event references; compact pack files")
    gc.add_argument("store", type=Path, metavar="DIR")
    gc.add_argument("--db", required=True, help="the event log whose references keep chunks alive")
    gc.add_argument("--dry-run", action="store_true", help="only report what would be deleted")
    parser.set_defaults(func=cmd_chunks)


def _bar(label: str) -> Any:
    def progress(done: int, total: int) -> None:
        if not sys.stderr.isatty() and done not in (total,):
            return
        width = 30
        filled = width * done // max(total, 1)
        sys.stderr.write(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return progress


def reachable(log: EventRecorder, store: LocalChunkStore, progress: Any = None) -> tuple[set[str], list[str]]:
    """Addresses reachable from the log's events, and the referenced manifests the store lacks."""
    manifests: list[str] = []
    for event in log.read():
        manifests.extend(refs_in(event.data))
    manifests = list(dict.fromkeys(manifests))
    keep: set[str] = set()
    lost: list[str] = []
    for i, digest in enumerate(manifests, 1):
        keep.add(digest)
        try:
            keep.update(Manifest.from_bytes(store.get(digest)).chunk_digests())
        except (ChunkError, ManifestError):
            lost.append(digest)
        if progress is not None:
            progress(i, len(manifests))
    return keep, lost


def cmd_chunks(args: argparse.Namespace) -> int:
    """Run one chunk-store action."""
    if not (args.store / "index.db").exists():
        raise ConfigError(f"{args.store} is not a chunk store (no index.db)")
    store = LocalChunkStore(args.store)
    try:
        status = 0
        if args.action == "stats":
            out: dict[str, Any] = store.stats()
        elif args.action == "verify":
            bad = store.verify_all(_bar("verify"))
            out = {"checked": store.stats()["chunks"] + len(bad), "corrupt": bad}
            status = 1 if bad else 0
        else:
            with open_recorder(args.db) as log:
                keep, lost = reachable(log, store, _bar("scan manifests"))
            garbage = [d for d in store.digests() if d not in keep]
            out = {"referenced": len(keep), "garbage": len(garbage), "missing_manifests": lost,
                   "dry_run": args.dry_run}
            if not args.dry_run:
                out["deleted"] = store.delete(garbage)
                out["reclaimed_bytes"] = store.compact(_bar("compact"))
        out_text = orjson.dumps(out, option=orjson.OPT_INDENT_2).decode() if args.json else \
            "\n".join(f"{k}: {v}" for k, v in out.items())
        print(out_text)
        return status
    finally:
        store.close()
