"""Site liveness on the server: one ``site`` machine per site, fed by every contact.

Any contact (asking for work, submitting, checking a task, a heartbeat) connects a
registered site, re-arms an active site's heartbeat deadline or reconnects a
missing or dead one. The engine's timer moves a silent active site to missing and,
after the grace, to dead. The timer's event carries no data, so when the configured
grace differs from the chart's default this layer records ``report_dead`` with the
explicit end of the grace (counted from the moment the heartbeat went overdue). A
dead-client report moves an active site to missing at once.

Heartbeats are recorded at most every ``record_interval`` seconds per site (each
recorded one re-arms the full timeout), so a site polling many times a second does
not write an event per poll.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, Final

from engine.errors import ConcurrencyConflict, ConfigError, TransitionRejected, UnknownMachine
from engine.machines.runtime import Runtime
from engine.machines.state import MachineState
from engine.provision import check_name
from engine.tasks.spec import TaskError, check_seconds

__all__ = ["ELIGIBLE_STATES", "SiteTracker", "check_site", "site_machine_id"]

logger = logging.getLogger(__name__)

US = 1_000_000
#: site states whose sites a task with targets=None is sent to
ELIGIBLE_STATES: Final = frozenset({"registered", "active", "missing"})
_DEAD_STATES: Final = frozenset({"dead", "removed"})
_PREFIX = "site:"


def site_machine_id(site: str) -> str:
    """The id of a site's liveness machine."""
    return f"{_PREFIX}{site}"


def check_site(site: Any, argument: str) -> str:
    """``site`` if it can name a site (the provisioning rule), else TaskError naming ``argument``."""
    if not isinstance(site, str):
        raise TaskError(argument, f"a site name must be a string, got {site!r}")
    try:
        return check_name(site)
    except ConfigError as exc:
        raise TaskError(argument, str(exc)) from None


class SiteTracker:
    """Keeps every site's machine current and answers "is it dead?" from memory.

    Args:
        runtime: the machine runtime (its ``site`` chart).
        heartbeat_timeout: seconds of silence after which an active site is missing.
        dead_grace: seconds a missing site has before it is dead.
        record_interval: record a heartbeat only when it moves the deadline by this much.
        on_change: called on the loop with (site, state) whenever a site changes state.
    """

    def __init__(self, runtime: Runtime, *, heartbeat_timeout: float = 60.0, dead_grace: float = 60.0,
                 record_interval: float = 1.0,
                 on_change: Callable[[str, str], None] | None = None) -> None:
        self.runtime = runtime
        self.heartbeat_timeout = check_seconds(heartbeat_timeout, "heartbeat_timeout")
        self.dead_grace = check_seconds(dead_grace, "dead_grace")
        if self.heartbeat_timeout <= 0 or self.dead_grace <= 0:
            raise TaskError("heartbeat_timeout", "heartbeat_timeout and dead_grace must be positive")
        self.record_interval = check_seconds(record_interval, "heartbeat_record_interval")
        self.states: dict[str, str] = {}
        self._on_change = on_change

    # -- queries --------------------------------------------------------------------

    def is_dead(self, site: str) -> bool:
        """True when the site is declared dead (or removed)."""
        return self.states.get(site) in _DEAD_STATES

    def eligible(self) -> list[str]:
        """Sites a task with targets=None goes to: known and not declared dead, by name."""
        return sorted(s for s, state in self.states.items() if state in ELIGIBLE_STATES)

    def load(self) -> None:
        """Read every site's state from the projection (recovery)."""
        for row in self.runtime.recorder.machines(kind="site"):
            if row.machine_id.startswith(_PREFIX):
                self.states[row.machine_id[len(_PREFIX):]] = row.state

    def _note(self, site: str, state: MachineState) -> str:
        before = self.states.get(site)
        self.states[site] = state.state
        if before != state.state and self._on_change is not None:
            try:
                self._on_change(site, state.state)
            except Exception:
                logger.exception("site listener failed for %s -> %s", site, state.state)
        return state.state

    def refresh(self, site: str) -> str | None:
        """Re-read a site's state from the runtime (after the timer moved it)."""
        try:
            return self._note(site, self.runtime.get(site_machine_id(site)))
        except UnknownMachine:
            return None

    # -- changes --------------------------------------------------------------------

    async def register(self, site: str) -> str:
        """Make the site known (state registered) unless it already is; return its state."""
        check_site(site, "site")
        mid = site_machine_id(site)
        try:
            return self._note(site, self.runtime.get(mid))
        except UnknownMachine:
            pass
        try:
            state = await self.runtime.create_async("site", machine_id=mid, site=site, data={"site": site})
        except ConcurrencyConflict:
            state = self.runtime.get(mid)
        return self._note(site, state)

    async def contact(self, site: str, reason: str) -> str:
        """Record that the site made contact; return its state afterwards."""
        mid = site_machine_id(site)
        for _ in range(4):
            try:
                current = self.runtime.get(mid)
            except UnknownMachine:
                await self.register(site)
                continue
            try:
                state = await self._beat(mid, current, reason)
            except (TransitionRejected, ConcurrencyConflict):
                continue  # the timer moved it meanwhile: look again
            return self._note(site, state)
        return self._note(site, self.runtime.get(mid))

    async def _beat(self, mid: str, current: MachineState, reason: str) -> MachineState:
        data = {"heartbeat_timeout": self.heartbeat_timeout, "reason": reason}
        if current.state == "registered":
            return await self.runtime.fire_async(mid, "connect", data)
        if current.state in ("missing", "dead"):
            return await self.runtime.fire_async(mid, "reconnect", data)
        if current.state == "active":
            deadline = self.runtime.clock.now_us() + round(self.heartbeat_timeout * US)
            if current.deadline_us is not None and deadline - current.deadline_us < self.record_interval * US:
                return current
            return await self.runtime.fire_async(mid, "heartbeat", deadline_us=deadline)
        return current  # removed: nothing to record

    async def report_dead(self, site: str, reason: str) -> str | None:
        """A dead-client report: an active site goes missing now (a missing one keeps its grace)."""
        mid = site_machine_id(site)
        try:
            current = self.runtime.get(mid)
        except UnknownMachine:
            return None
        if current.state == "active":
            try:
                current = await self.runtime.fire_async(
                    mid, "report_dead", {"dead_grace": self.dead_grace, "reason": reason})
            except (TransitionRejected, ConcurrencyConflict):
                current = self.runtime.get(mid)
        return self._note(site, current)

    async def went_missing(self, site: str, trigger: str, data: Mapping[str, Any] | None) -> None:
        """The heartbeat timer made the site missing: hold it for the configured grace."""
        if trigger != "timeout":
            return  # a report_dead carried the grace itself
        mid = site_machine_id(site)
        current = self.runtime.get(mid)
        self._note(site, current)
        overdue = (data or {}).get("deadline_us")
        if current.state != "missing" or not isinstance(overdue, int):
            return
        deadline = overdue + round(self.dead_grace * US)
        if current.deadline_us == deadline:
            return
        try:
            state = await self.runtime.fire_async(
                mid, "report_dead", {"dead_grace": self.dead_grace, "reason": "heartbeat_overdue"},
                deadline_us=deadline)
        except (TransitionRejected, ConcurrencyConflict):
            state = self.runtime.get(mid)
        self._note(site, state)
