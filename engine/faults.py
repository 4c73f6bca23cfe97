"""Crash points: SIGKILL this process at a named point of a round, for crash tests and simulations.

``FEDLOG_CRASH_AT`` holds comma-separated ``ROUND.PHASE`` points; the process kills
itself with SIGKILL (no clean-up, no flush: as a power cut would) the first time it
reaches one. Phases:

- ``dispatch``: an assignment of the round was recorded as sent, before the site got it;
- ``result``: a site's result of the round was recorded, before the site got the answer;
- ``aggregate``: the controller aggregated the round, before its result was recorded.

Swarm sites (``engine.swarm``) have their own points:

- ``train``: the site recorded that it is training, before the learner returned;
- ``upload``: half of the site's result chunks are on the server, the submission not yet made;
- ``gather``: the round's aggregator recorded its first accepted result (mid-gather);
- ``scatter``: the aggregator stored and uploaded the next model, before any learn task went out.

``FEDLOG_CRASH_AFTER_APPENDS=N`` kills the process once N events it appended to its
log are durable (counted from its start), before the code that fired them goes on:
a random log position rather than a named point, which is how ``fedlog simulate
--kill-server-random`` / ``--kill-client-random`` pick their instants, so that a kill
lands inside the job however fast the job runs.

Unset (the normal case) the checks cost one dictionary lookup. ``fedlog simulate
--kill-server-at`` sets the variable for one server incarnation and restarts the
server without it once the process died.
"""

from __future__ import annotations

import os
import signal

__all__ = ["APPENDS_ENV", "CRASH_ENV", "PHASES", "appended", "crash_points", "maybe_crash"]

CRASH_ENV = "FEDLOG_CRASH_AT"
APPENDS_ENV = "FEDLOG_CRASH_AFTER_APPENDS"
PHASES = ("dispatch", "result", "aggregate", "train", "upload", "gather", "scatter")


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


def _appends_left() -> int | None:
    text = os.environ.get(APPENDS_ENV)
    if not text:
        return None
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{APPENDS_ENV} must be a number of events >= 1, got {text!r}")
    return int(text)


_APPENDS_LEFT = _appends_left()


def appended(count: int) -> None:
    """``count`` more events of this process are durable; SIGKILL it if that reaches its append limit."""
    global _APPENDS_LEFT
    if _APPENDS_LEFT is None:
        return
    _APPENDS_LEFT -= count
    if _APPENDS_LEFT <= 0:
        os.kill(os.getpid(), signal.SIGKILL)
