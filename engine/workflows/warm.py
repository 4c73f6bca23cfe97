"""The warm child of ``engine.workflows.isolated``, started before the server imports anything heavy.

The child that builds a job's initial model imports torch (~1 s of CPU), and the
first round waits for it. ``fedlog server --preload MODULE`` starts it first thing,
so this module imports nothing but the standard library: the server's own imports
(its SQL layer, uvicorn, numpy for the payload code) then run while the child
imports torch, not before it starts. ``isolated`` takes the child for its next call.
"""

from __future__ import annotations

import subprocess
import sys
import threading

__all__ = ["CHILD", "current", "prewarm", "take"]

#: the child's command line (``isolated``'s ``main``)
CHILD = [sys.executable, "-m", "engine.workflows.isolated"]

_warm: subprocess.Popen[str] | None = None
_lock = threading.Lock()


def prewarm(modules: list[str]) -> None:
    """Start a child that imports ``modules`` now and runs the next isolated call (then exits)."""
    global _warm
    with _lock:
        if _warm is None or _warm.poll() is not None:
            _warm = subprocess.Popen([*CHILD, "serve", *modules], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)


def current() -> subprocess.Popen[str] | None:
    """The waiting child, if one was started and not yet taken."""
    return _warm


def take() -> subprocess.Popen[str] | None:
    """The waiting child, handed over once (None if none was started or it died waiting)."""
    global _warm
    with _lock:
        child, _warm = _warm, None
    if child is not None and child.poll() is not None:
        child.communicate()
        return None  # it died waiting (its stdin closed, or an import failed): start a fresh one
    return child
