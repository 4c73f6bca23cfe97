"""The task manager's in-memory picture of tasks, folded from their events.

A ``TaskRecord`` holds what the completion rules need about one task (its
scheduling parameters, where a relay or SEQUENTIAL send stands, and one
``ClientTaskRecord`` per share); both are caches of the log. The live path and
recovery update them through the same ``apply`` methods, one event at a time, so a
manager rebuilt from the log after a restart holds exactly what the crashed one held.

Ids: a task is ``<task_id>``; a share is ``<task_id>/<site>`` (broadcast, send),
``<task_id>/<hop>`` (relay, whose hops may repeat a site) and, for the later rounds
of a broadcast_forever, ``<task_id>/<site>/<k>``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from engine.log.recorder import EventRecorder, StoredEvent
from engine.tasks.spec import METHODS, RELAY, SEND, SendOrder

__all__ = [
    "LIVE_CT_STATES",
    "SAME",
    "STANDING_STATES",
    "ClientTaskRecord",
    "TaskRecord",
    "Unscheduled",
    "client_task_id",
    "load_share",
    "load_task",
    "task_id_of",
]

#: task chart states in which a task is standing (waiting for sites)
STANDING_STATES: Final = frozenset({"standing", "min_received"})
#: client_task chart states in which a share is still open
LIVE_CT_STATES: Final = frozenset({"assigned", "sent"})


class _Same:
    """Marker: no callback replaced the data (the share gets the task's or hop's data)."""

    _instance: _Same | None = None

    def __new__(cls) -> _Same:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "SAME"


SAME: Final = _Same()


def client_task_id(task_id: str, key: str | int, k: int = 0) -> str:
    """The id of a share: ``key`` is the site (or the hop number of a relay)."""
    return f"{task_id}/{key}" if k == 0 else f"{task_id}/{key}/{k}"


def task_id_of(ct_id: str) -> str:
    """The task a share id belongs to (task ids never contain '/')."""
    return ct_id.split("/", 1)[0]


@dataclass
class ClientTaskRecord:
    """One share of a task (a client_task machine) as the rules see it."""

    ct_id: str
    site: str
    #: relay hop, SEQUENTIAL send slot, broadcast_forever round (None: broadcast, ANY send)
    hop: int | None
    state: str = "assigned"
    deadline_us: int | None = None
    send_count: int = 0
    sent_us: int | None = None
    #: what the last send carried when a callback replaced the data (SAME: the base data)
    sent_data: Any = SAME
    result: Any = None
    received_us: int | None = None
    #: a relay hop's data for the next hop, when its result callback replaced it
    next_data: Any = SAME
    #: the deadline that passed when this share timed out
    expired_deadline_us: int | None = None

    @property
    def live(self) -> bool:
        """True while the share may still be sent or answered."""
        return self.state in LIVE_CT_STATES

    def apply(self, trigger: str, data: Mapping[str, Any] | None, ts_us: int, dest: str,
              deadline_us: int | None) -> None:
        """Fold one event of this client_task (live and recovery share this)."""
        data = data or {}
        if trigger in ("send", "resend"):
            self.send_count += 1
            if trigger == "send":
                self.sent_us = ts_us
            if "data" in data:
                self.sent_data = data["data"]
        elif trigger == "result":
            self.result = data.get("result")
            self.received_us = ts_us
            if "next_data" in data:
                self.next_data = data["next_data"]
        elif trigger == "timeout":
            self.expired_deadline_us = data.get("deadline_us", self.deadline_us)
        self.state = dest
        self.deadline_us = deadline_us


@dataclass(frozen=True, slots=True)
class Unscheduled:
    """A task machine that was created but whose scheduling event is not in the log."""

    task_id: str
    name: str | None


@dataclass(eq=False)
class TaskRecord:
    """One scheduled task: its parameters (from the scheduling event) and its shares."""

    task_id: str
    job_id: str | None
    round: int | None
    name: str
    method: str
    targets: list[str]
    requested_targets: list[str] | None
    min_responses: int
    wait_time_after_min_received: float
    send_order: SendOrder
    task_assignment_timeout: float
    task_result_timeout: float
    dynamic_targets: bool
    forever: bool
    timeout: float
    data: Any
    props: dict[str, Any]
    scheduled_us: int
    #: the task's own deadline (None: no timeout)
    deadline_us: int | None
    state: str = "standing"
    #: relay hop / SEQUENTIAL send slot currently open
    hop: int = 0
    #: the current relay hop's data when a result callback replaced it (SAME: the task data)
    hop_data: Any = SAME
    window_start_us: int = 0
    min_reached_us: int | None = None
    wait_deadline_us: int | None = None
    #: why the task ended (from its terminal event)
    reason: str | None = None
    #: log position of the scheduling event (orders standing tasks after a recovery)
    schedule_seq: int = 0
    cts: dict[str, ClientTaskRecord] = field(default_factory=dict)
    #: site -> its latest share (not used by relays, whose shares are per hop)
    site_ct: dict[str, str] = field(default_factory=dict)

    @staticmethod
    def schedule_data(
        *, name: str, method: str, targets: Sequence[str], requested_targets: Sequence[str] | None,
        min_responses: int, wait_time_after_min_received: float, send_order: SendOrder,
        task_assignment_timeout: float, task_result_timeout: float, dynamic_targets: bool,
        forever: bool, timeout: float, data: Any, props: Mapping[str, Any],
    ) -> dict[str, Any]:
        """The scheduling event's data: everything the completion rules and a recovery need."""
        return {
            "name": name, "method": method, "targets": list(targets),
            "requested_targets": None if requested_targets is None else list(requested_targets),
            "min_responses": min_responses,
            "wait_time_after_min_received": wait_time_after_min_received,
            "send_order": send_order.value, "task_assignment_timeout": task_assignment_timeout,
            "task_result_timeout": task_result_timeout, "dynamic_targets": dynamic_targets,
            "forever": forever,
            # the chart arms the standing timer from this key; null arms none
            "timeout": timeout or None,
            "data": data, "props": dict(props),
        }

    @classmethod
    def from_schedule(
        cls, task_id: str, data: Mapping[str, Any], *, ts_us: int, deadline_us: int | None,
        job_id: str | None, round: int | None,
    ) -> TaskRecord:
        """The record of a task right after its scheduling event."""
        return cls(
            task_id=task_id, job_id=job_id, round=round, name=data["name"], method=data["method"],
            targets=list(data["targets"]), requested_targets=data.get("requested_targets"),
            min_responses=int(data["min_responses"]),
            wait_time_after_min_received=float(data["wait_time_after_min_received"]),
            send_order=SendOrder(data["send_order"]),
            task_assignment_timeout=float(data["task_assignment_timeout"]),
            task_result_timeout=float(data["task_result_timeout"]),
            dynamic_targets=bool(data["dynamic_targets"]), forever=bool(data["forever"]),
            timeout=float(data["timeout"] or 0), data=data.get("data"), props=dict(data.get("props") or {}),
            scheduled_us=ts_us, deadline_us=deadline_us, window_start_us=ts_us,
        )

    # -- folding ---------------------------------------------------------------------

    def apply(self, trigger: str, data: Mapping[str, Any] | None, ts_us: int, dest: str,
              deadline_us: int | None) -> None:
        """Fold one event of this task after its scheduling event (live and recovery)."""
        data = data or {}
        if trigger == "advance":
            self.hop = int(data["index"])
            self.window_start_us = int(data.get("window_start_us", ts_us))
            if "data" in data:
                self.hop_data = data["data"]
        elif trigger == "add_target":
            self.targets.append(str(data["site"]))
        elif trigger == "min_reached":
            self.min_reached_us = ts_us
            self.wait_deadline_us = deadline_us
        elif dest not in STANDING_STATES:
            # the engine's timer writes no reason: its trigger (timeout, wait_elapsed) is one
            self.reason = data.get("reason") or trigger
        self.state = dest

    def add(self, ct: ClientTaskRecord) -> None:
        """Remember a share (the newest share of a site is the one it is asked about)."""
        self.cts[ct.ct_id] = ct
        if self.method != RELAY:
            self.site_ct[ct.site] = ct.ct_id

    # -- views -----------------------------------------------------------------------

    @property
    def standing(self) -> bool:
        """True while sites may take the task."""
        return self.state in STANDING_STATES

    @property
    def sequential_send(self) -> bool:
        """A send in SEQUENTIAL order (one slot at a time)."""
        return self.method == SEND and self.send_order is SendOrder.SEQUENTIAL

    def ct_of(self, site: str) -> ClientTaskRecord | None:
        """The site's latest share (broadcast, send)."""
        ct_id = self.site_ct.get(site)
        return None if ct_id is None else self.cts[ct_id]

    def hop_ct(self, hop: int) -> ClientTaskRecord | None:
        """The share of a relay hop or SEQUENTIAL slot, if it was created."""
        if self.method == RELAY:
            return self.cts.get(client_task_id(self.task_id, hop))
        if hop >= len(self.targets):
            return None
        return self.cts.get(client_task_id(self.task_id, self.targets[hop]))

    def bound(self) -> ClientTaskRecord | None:
        """A send's share that was handed out (a send goes to one site only)."""
        for ct in self.cts.values():
            if ct.sent_us is not None:
                return ct
        return None

    def base_data(self, ct: ClientTaskRecord) -> Any:
        """What a share is sent unless a callback says otherwise."""
        if ct.sent_data is not SAME:
            return ct.sent_data
        if self.method == RELAY and ct.hop == self.hop and self.hop_data is not SAME:
            return self.hop_data
        return self.data

    def shares(self) -> list[ClientTaskRecord]:
        """Every share in the deterministic order outcomes use (target, then round; or hop)."""
        if self.method == RELAY:
            return sorted(self.cts.values(), key=lambda c: c.hop or 0)
        order = {site: i for i, site in reversed(list(enumerate(self.targets)))}
        return sorted(self.cts.values(), key=lambda c: (order.get(c.site, len(order)), c.hop or 0))

    def expected_shares(self) -> list[tuple[str, str, int | None]]:
        """(id, site, hop) of the shares the log may hold for this task (forever rounds aside)."""
        t = self.task_id
        if self.method == RELAY:
            last = min(self.hop, len(self.targets) - 1)
            return [(client_task_id(t, h), self.targets[h], h) for h in range(last + 1)]
        if self.sequential_send:
            last = min(self.hop, len(self.targets) - 1)
            return [(client_task_id(t, s), s, i) for i, s in enumerate(self.targets[: last + 1])]
        hop = 0 if self.forever else None
        return [(client_task_id(t, s), s, hop) for s in self.targets]


def _fold_share(ct_id: str, site: str, hop: int | None, events: Sequence[StoredEvent]) -> ClientTaskRecord:
    ct = ClientTaskRecord(ct_id, events[0].site or site, hop)
    for e in events:
        ct.apply(e.trigger, e.data, e.ts_us, e.dest, e.deadline_us)
    return ct


def load_share(recorder: EventRecorder, ct_id: str, site: str, hop: int | None) -> ClientTaskRecord | None:
    """Rebuild one share's record from the log (None: no such share)."""
    events = list(recorder.read(machine_id=ct_id))
    return _fold_share(ct_id, site, hop, events) if events else None


def load_task(recorder: EventRecorder, task_id: str) -> TaskRecord | Unscheduled | None:
    """Rebuild a task's record from the log (None: no such task)."""
    events = list(recorder.read(machine_id=task_id))
    if not events:
        return None
    rec: TaskRecord | None = None
    for e in events:
        if rec is None:
            if e.trigger in METHODS:
                rec = TaskRecord.from_schedule(task_id, e.data or {}, ts_us=e.ts_us, deadline_us=e.deadline_us,
                                               job_id=e.job_id, round=e.round)
                rec.state = e.dest
                rec.schedule_seq = e.seq
            continue
        rec.apply(e.trigger, e.data, e.ts_us, e.dest, e.deadline_us)
    if rec is None:
        first = events[0].data or {}
        return Unscheduled(task_id, first.get("name"))
    for ct_id, site, hop in rec.expected_shares():
        share = load_share(recorder, ct_id, site, hop)
        k = 0
        while share is not None:
            rec.add(share)
            if not rec.forever:
                break
            k += 1  # a broadcast_forever's later rounds, until the first that was never created
            share = load_share(recorder, client_task_id(task_id, site, k), site, k)
    return rec

