"""The completion rules: given a task's record and the time, what happens next.

``decide`` is a pure function: it reads a ``TaskRecord`` and returns one step (end
the task, note that min_responses are in, time out a share, move a relay or
SEQUENTIAL send on, create missing shares) or ``Idle`` with the time at which the
answer may change. The manager performs the step, folds the event it wrote into the
record and asks again until the answer is ``Idle``; after a restart it asks the same
questions of the record rebuilt from the log, so an interrupted sequence of steps
simply continues.

Checks, in the reference's order: the method's own exit rule (completion, or a
send/relay that ran out of targets), then the task's timeout (inclusive), then
dead targets (only after a grace period from scheduling), then progress.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from engine.tasks.records import SAME, TaskRecord, client_task_id
from engine.tasks.spec import BROADCAST, SEND

__all__ = [
    "Advance",
    "Create",
    "End",
    "Expire",
    "Idle",
    "ReachMin",
    "Step",
    "decide",
    "remaining_sites",
    "sequential_index",
]

US = 1_000_000


@dataclass(frozen=True, slots=True)
class End:
    """Fire ``trigger`` on the task: it is over."""

    trigger: str
    reason: str
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ReachMin:
    """A broadcast has its min_responses: wait ``wait`` seconds for the others."""

    wait: float
    received: int


@dataclass(frozen=True, slots=True)
class Expire:
    """Time out one share whose own deadline has passed (the timer may not have fired yet)."""

    ct_id: str
    deadline_us: int


@dataclass(frozen=True, slots=True)
class Advance:
    """Open the next relay hop or SEQUENTIAL send slot."""

    index: int
    reason: str
    window_start_us: int
    #: the next hop's data when a result callback replaced it (SAME: unchanged)
    data: Any = SAME


@dataclass(frozen=True, slots=True)
class Create:
    """Create shares the task needs and does not have: (id, site, hop, deadline_us)."""

    shares: tuple[tuple[str, str, int | None, int | None], ...]


@dataclass(frozen=True, slots=True)
class Idle:
    """Nothing to do now; ask again at ``wake_at_us`` (None: only when something happens)."""

    wake_at_us: int | None = None


Step = End | ReachMin | Expire | Advance | Create | Idle


def _us(seconds: float) -> int:
    return round(seconds * US)


def sequential_index(rec: TaskRecord, now_us: int) -> int:
    """The SEQUENTIAL send slot open at ``now_us``: floor(elapsed / task_assignment_timeout)."""
    slot = _us(rec.task_assignment_timeout)
    if slot <= 0:
        return 0  # no assignment timeout: only the first target, for as long as the task stands
    return max(0, (now_us - rec.scheduled_us) // slot)


def _answered(rec: TaskRecord) -> int:
    return sum(1 for site in rec.targets if (ct := rec.ct_of(site)) is not None and ct.state == "result_received")


def remaining_sites(rec: TaskRecord, now_us: int) -> list[str]:
    """The targets the task still waits on (all dead -> CLIENT_DEAD, after the grace)."""
    if rec.method == BROADCAST:
        if rec.forever:
            return list(rec.targets)
        return [s for s in rec.targets if (ct := rec.ct_of(s)) is None or ct.state != "result_received"]
    if rec.method == SEND:
        bound = rec.bound()
        if bound is not None:
            return [] if bound.state == "result_received" else [bound.site]
        if rec.sequential_send:
            return rec.targets[max(rec.hop, sequential_index(rec, now_us)):]
        return list(rec.targets)
    return rec.targets[rec.hop:]


def _exit_rule(rec: TaskRecord, now_us: int) -> End | None:
    if rec.method == BROADCAST:
        if rec.forever:
            return None  # broadcast_forever never completes on its own
        n = len(rec.targets)
        answered = _answered(rec)
        if answered >= n:
            return End("complete", "all_answered")
        need = n if rec.min_responses == 0 else rec.min_responses
        if answered >= need:
            if rec.wait_time_after_min_received <= 0:
                return End("complete", "min_responses")
            if (rec.state == "min_received" and rec.wait_deadline_us is not None
                    and now_us >= rec.wait_deadline_us):
                return End("wait_elapsed", "wait_elapsed")
        return None
    if rec.method == SEND:
        bound = rec.bound()
        if bound is not None:
            return End("complete", "first_result") if bound.state == "result_received" else None
        if rec.sequential_send:
            current = rec.hop_ct(rec.hop)
            if (current is not None and current.state == "timed_out"
                    and max(rec.hop + 1, sequential_index(rec, now_us)) >= len(rec.targets)):
                return End("timeout", "no_target_took_it")
        return None
    current = rec.hop_ct(rec.hop)
    if current is None or rec.hop + 1 < len(rec.targets):
        return None
    if current.state == "result_received":
        return End("complete", "last_hop")
    if current.state == "timed_out":
        # out of hops: OK if the last hop that took the task answered (the reference's rule)
        taken = [c for c in rec.cts.values() if c.sent_us is not None]
        last = max(taken, key=lambda c: c.hop or 0, default=None)
        if last is not None and last.state == "result_received":
            return End("complete", "targets_exhausted")
        return End("timeout", "targets_exhausted")
    return None


def _progress(rec: TaskRecord, now_us: int) -> Step | None:
    t = rec.task_id
    if rec.method == BROADCAST:
        hop = 0 if rec.forever else None
        missing = tuple((client_task_id(t, s), s, hop, None) for s in rec.targets if s not in rec.site_ct)
        if missing:
            return Create(missing)
        if not rec.forever and rec.state == "standing":
            need = len(rec.targets) if rec.min_responses == 0 else rec.min_responses
            answered = _answered(rec)
            if answered >= need:
                return ReachMin(rec.wait_time_after_min_received, answered)
        return None
    if rec.method == SEND:
        if rec.bound() is not None:
            return None
        if not rec.sequential_send:
            missing = tuple((client_task_id(t, s), s, None, None) for s in rec.targets if s not in rec.site_ct)
            return Create(missing) if missing else None
        slot = _us(rec.task_assignment_timeout)
        current = rec.hop_ct(rec.hop)
        if current is None:
            if rec.hop >= len(rec.targets):
                return None
            deadline = rec.scheduled_us + (rec.hop + 1) * slot if slot > 0 else None
            site = rec.targets[rec.hop]
            return Create(((client_task_id(t, site), site, rec.hop, deadline),))
        index = sequential_index(rec, now_us)
        if current.live:
            deadline = current.deadline_us
            if index > rec.hop or (deadline is not None and now_us >= deadline):
                return Expire(current.ct_id, deadline or rec.scheduled_us + (rec.hop + 1) * slot)
            return None
        if current.state == "timed_out":
            # the slot passed unclaimed: the slot open now (at least the next one) takes over
            index = max(rec.hop + 1, index)
            if index < len(rec.targets):
                return Advance(index, "assignment_timeout", rec.scheduled_us + index * slot)
        return None
    # relay: one hop at a time, in target order
    current = rec.hop_ct(rec.hop)
    if current is None:
        if rec.hop >= len(rec.targets):
            return None
        assign = _us(rec.task_assignment_timeout)
        deadline = rec.window_start_us + assign if assign > 0 else None
        return Create(((client_task_id(t, rec.hop), rec.targets[rec.hop], rec.hop, deadline),))
    if current.live and current.deadline_us is not None and now_us >= current.deadline_us:
        return Expire(current.ct_id, current.deadline_us)
    if rec.hop + 1 >= len(rec.targets):
        return None
    if current.state == "result_received":
        return Advance(rec.hop + 1, "result", current.received_us or now_us, current.next_data)
    if current.state == "timed_out":
        return Advance(rec.hop + 1, "skipped", current.expired_deadline_us or now_us)
    return None


def decide(rec: TaskRecord, now_us: int, is_dead: Callable[[str], bool], dead_grace_us: int) -> Step:
    """The next step for a standing task at ``now_us`` (``Idle`` when there is none)."""
    if not rec.standing:
        return Idle()
    end = _exit_rule(rec, now_us)
    if end is not None:
        return end
    if rec.deadline_us is not None and now_us >= rec.deadline_us:
        return End("timeout", "timeout")
    wake: list[int] = []
    remaining = remaining_sites(rec, now_us)
    if remaining and all(is_dead(s) for s in remaining):
        at = rec.scheduled_us + dead_grace_us
        if now_us >= at:
            return End("targets_dead", "targets_dead", {"dead": sorted(set(remaining))})
        wake.append(at)
    step = _progress(rec, now_us)
    if step is not None:
        return step
    # in min_received the engine's timer is the wait; the task's own deadline is ours to watch
    if (rec.state == "min_received" and rec.deadline_us is not None
            and (rec.wait_deadline_us is None or rec.deadline_us < rec.wait_deadline_us)):
        wake.append(rec.deadline_us)
    return Idle(min(wake) if wake else None)

