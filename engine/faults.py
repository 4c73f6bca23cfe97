"""Crash points: SIGKILL this process at a named point of a round, for crash tests and simulations.

``FEDLOG_CRASH_AT`` holds comma-separated ``ROUND.PHASE`` points; the process kills
itself with SIGKILL (no clean-up, no flush: as a power cut would) the first time it
reaches one. Phases:

- ``dispatch``: an assignment of the round was recorded as sent, before the site got it;
- ``result``: a site's result of the round was recorded, before the site got the answer;
- ``aggregate``: the controller aggregated the round, before its result was recorded.

Unset (the normal case) the checks cost one dictionary lookup. ``fedlog simulate
--kill-server-at`` sets the variable for one server incarnation and restarts the
server without it once the process died.
"""

from __future__ import annotations

import os
import signal

__all__ = ["CRASH_ENV", "PHASES", "crash_points", "maybe_crash"]

CRASH_ENV = "FEDLOG_CRASH_AT"
PHASES = ("dispatch", "result", "aggregate")


def crash_points(text: str | None) -> frozenset[str]:
    """Parse ``ROUND.PHASE[,ROUND.PHASE...]``; ValueError naming the bad entry."""
    points = set()
    for raw in (text or "").split(","):
        point = raw.strip()
        if not point:
            continue
        round_text, _, phase = point.partition(".")
        if not round_text.isdigit() or phase not in PHASES:
            raise ValueError(f"crash point {point!r} must look like ROUND.PHASE with PHASE one of {', '.join(PHASES)}")
        points.add(f"{int(round_text)}.{phase}")
    return frozenset(points)


_POINTS = crash_points(os.environ.get(CRASH_ENV))


def armed() -> bool:
    """True when this process has crash points (callers skip computing the round otherwise)."""
    return bool(_POINTS)


def maybe_crash(round_: int | None, phase: str) -> None:
    """SIGKILL this process if ``round_.phase`` is one of its crash points."""
    if _POINTS and round_ is not None and f"{round_}.{phase}" in _POINTS:
        os.kill(os.getpid(), signal.SIGKILL)
