"""The TensorServerStreamer role: task data tensors to the sites, recorded per site and per round.

The reference's ``TensorServerStreamer`` pushes a task's tensors to each client,
counts per round how many were sent and skipped and when sending started, waits up
to ``wait_send_task_data_all_clients_timeout`` for every client and then drops the
task data from memory (``try_to_clean_task_data``). fedlog's sites pull the chunks
they lack; this role keeps the same knobs and figures, in the log:

- when a site is handed a task named in ``tasks`` whose data references tensors, a
  ``stream_send`` machine ``tss:<client task>:<manifest>`` records the server's side of
  that site's download (offer, then the want list, batched acks and completion the
  site reports as its own ``stream_receive`` session moves), and the task's
  ``task_data`` machine (``td:<task>``) is created at the first such hand-out: its
  creation time is when sending started for the round;
- each site that finishes is a ``received`` event on ``td:<task>`` (``skipped`` when it
  already held every chunk, so nothing but the manifest moved);
- while sites are downloading, the payload's chunks are served from one in-memory
  copy (verified once, read once from the store, shared by every site); it is dropped
  (``release``) as soon as every site of the task has it, or when the wait times out
  (``timeout``: the log names the sites that lacked it; they still read the store);
- ``tensor_send_timeout`` is each site's per-entry timeout: no acknowledged batch for
  that long and the session's timer stalls it, on both sides.

``format`` is the tensor format; ``pytorch`` (torch state dicts and nested tensors)
is the one there is. A job sets the role with the spec's ``tensor_stream`` field.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from engine.errors import ChunkError, ConcurrencyConflict, ManifestError, TransitionRejected
from engine.tensors import Manifest, refs_in

if TYPE_CHECKING:
    from engine.server.service import FedServer

__all__ = ["FORMATS", "TensorServerStreamer", "TensorStreamConfig", "TensorStreamConfigError"]

logger = logging.getLogger(__name__)

FORMATS = ("pytorch",)
SWEEP_INTERVAL_S = 1.0
US = 1_000_000


class TensorStreamConfigError(ValueError):
    """A ``tensor_stream`` setting that cannot be used (the job spec names the field)."""


@dataclass(frozen=True)
class TensorStreamConfig:
    """The role's settings, with the reference's names and defaults."""

    format: str = "pytorch"
    tasks: tuple[str, ...] = ("train",)
    tensor_send_timeout: float = 30.0
    wait_send_task_data_all_clients_timeout: float = 300.0

    @classmethod
    def parse(cls, raw: Any) -> TensorStreamConfig:
        """Check a spec's ``tensor_stream`` object; raise ``TensorStreamConfigError`` naming the key."""
        if raw is None:
            return cls()
        if not isinstance(raw, Mapping):
            raise TensorStreamConfigError(f"must be an object, got {type(raw).__name__}")
        known = ("format", "tasks", "tensor_send_timeout", "wait_send_task_data_all_clients_timeout")
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise TensorStreamConfigError(f"{unknown[0]}: unknown key (known: {', '.join(known)})")
        fmt = raw.get("format", "pytorch")
        if fmt not in FORMATS:
            raise TensorStreamConfigError(f"format: {fmt!r} is not supported (supported: {', '.join(FORMATS)})")
        tasks = raw.get("tasks", ["train"])
        if tasks is None:
            tasks = ["train"]
        if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) and t for t in tasks):
            raise TensorStreamConfigError(f"tasks: must be a non-empty list of task names, got {tasks!r}")
        values = {}
        for key in ("tensor_send_timeout", "wait_send_task_data_all_clients_timeout"):
            value = raw.get(key, getattr(cls, key))
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
                    or value <= 0:
                raise TensorStreamConfigError(f"{key}: must be a number of seconds > 0, got {value!r}")
            values[key] = float(value)
        return cls(str(fmt), tuple(tasks), **values)

    def as_json(self) -> dict[str, Any]:
        return {"format": self.format, "tasks": list(self.tasks), "tensor_send_timeout": self.tensor_send_timeout,
                "wait_send_task_data_all_clients_timeout": self.wait_send_task_data_all_clients_timeout}


@dataclass
class _Pinned:
    """One task's payload held in memory while its sites download it."""

    task_id: str
    machine_id: str
    digests: set[str]


class TensorServerStreamer:
    """Records and serves tensor task data per task and site (see the module docstring)."""

    def __init__(self, server: FedServer) -> None:
        self.server = server
        self.runtime = server.runtime
        self._cache: dict[str, bytes] = {}
        self._users: dict[str, int] = {}
        self._pinned: dict[str, _Pinned] = {}
        self._lock = threading.Lock()
        self._last_sweep = 0.0
        #: "tss:<client task>:" -> the sessions of that share of the task (one per payload)
        self._by_share: dict[str, list[str]] = {}
        #: parsed manifests by address (content-addressed, so never stale); read once, not per site
        self._manifests: dict[str, Manifest | None] = {}

    # -- hand-out ----------------------------------------------------------------------------

    def on_dispatch(self, *, job_id: str | None, round: int | None, task_id: str, task_name: str,
                    client_task_id: str, site: str, data: Any, targets: list[str],
                    config: TensorStreamConfig) -> list[str]:
        """Record a site's share of a task's tensor data; return the session ids it should report on."""
        self.sweep()
        digests = refs_in(data)
        if not digests or task_name not in config.tasks:
            return []
        td = f"td:{task_id}"
        if self.server.recorder.get_machine(td) is None:
            self._create(td, job_id, round, {
                "task_id": task_id, "task_name": task_name, "sites": sorted(targets), "manifests": digests,
                "format": config.format,
                "wait_send_task_data_all_clients_timeout": config.wait_send_task_data_all_clients_timeout})
            self._pin(task_id, td, digests)
        sessions = [f"tss:{client_task_id}:{digest[:16]}" for digest in digests]
        self._by_share[f"tss:{client_task_id}:"] = list(sessions)
        for digest, session in zip(digests, sessions, strict=True):
            if self.server.recorder.get_machine(session) is not None:
                continue  # a resend of the same assignment: the same session
            size, chunks = self._size(digest)
            self._create(session, job_id, round, {"peer": site, "task_id": task_id, "manifest": digest,
                                                   "entry_timeout": config.tensor_send_timeout}, site=site)
            self._fire(session, "offer", {"manifest": digest, "bytes": size, "chunks": chunks})
        return sessions

    def _manifest(self, digest: str) -> Manifest | None:
        """The parsed manifest (None if the store lacks it or it is malformed), read once per address."""
        if digest not in self._manifests:
            if len(self._manifests) >= 1024:
                self._manifests.clear()
            try:
                self._manifests[digest] = Manifest.from_bytes(self.server.chunks.get(digest))
            except (ChunkError, ManifestError):
                return None  # not cached: it may be uploaded later
        return self._manifests[digest]

    def _size(self, digest: str) -> tuple[int, int]:
        manifest = self._manifest(digest)
        return (0, 0) if manifest is None else (manifest.nbytes, len(manifest.chunk_digests()))

    def _create(self, machine_id: str, job_id: str | None, round: int | None, data: dict[str, Any],
                site: str | None = None) -> None:
        kind = "task_data" if machine_id.startswith("td:") else "stream_send"
        with contextlib.suppress(ConcurrencyConflict):  # another hand-out created it first
            self.runtime.create(kind, machine_id=machine_id, data=data, job_id=job_id, round=round, site=site)

    def _fire(self, machine_id: str, trigger: str, data: dict[str, Any] | None = None, **kw: Any) -> bool:
        try:
            self.runtime.fire(machine_id, trigger, data, **kw)
        except (TransitionRejected, ConcurrencyConflict) as exc:
            logger.info("%s: %s not recorded (%s)", machine_id, trigger, exc)
            return False
        return True

    # -- the in-memory copy --------------------------------------------------------------------

    def _pin(self, task_id: str, machine_id: str, digests: list[str]) -> None:
        held: set[str] = set(digests)
        for digest in digests:
            manifest = self._manifest(digest)
            if manifest is not None:
                held.update(manifest.chunk_digests())
        with self._lock:
            if task_id in self._pinned:
                return  # two sites were handed the task at once; one copy
            self._pinned[task_id] = _Pinned(task_id, machine_id, held)
            for digest in held:
                self._users[digest] = self._users.get(digest, 0) + 1

    def chunk(self, digest: str) -> bytes | None:
        """A pinned chunk's bytes from memory (read and verified once from the store), or None."""
        with self._lock:
            if digest not in self._users:
                return None
            data = self._cache.get(digest)
        if data is None:
            data = self.server.chunks.get(digest)
            with self._lock:
                if digest in self._users:
                    self._cache[digest] = data
        return data

    @property
    def cached_bytes(self) -> int:
        """Bytes of task data held in memory now."""
        with self._lock:
            return sum(len(v) for v in self._cache.values())

    def _unpin(self, task_id: str) -> None:
        with self._lock:
            pinned = self._pinned.pop(task_id, None)
            if pinned is None:
                return
            for digest in pinned.digests:
                left = self._users.get(digest, 0) - 1
                if left <= 0:
                    self._users.pop(digest, None)
                    self._cache.pop(digest, None)
                else:
                    self._users[digest] = left

    def sweep(self, force: bool = False) -> None:
        """Drop the copies of tasks whose wait timed out (the ``task_data`` timer fired)."""
        now = time.monotonic()
        if not force and now - self._last_sweep < SWEEP_INTERVAL_S:
            return
        self._last_sweep = now
        with self._lock:
            pinned = list(self._pinned.values())
        for p in pinned:
            row = self.server.recorder.get_machine(p.machine_id)
            if row is None or row.terminal:
                self._unpin(p.task_id)

    # -- the sites' reports ----------------------------------------------------------------------

    def on_report(self, site: str, session: str, event: str, data: Mapping[str, Any]) -> str:
        """Record a site's progress on one of its sessions; return the server-side machine's state."""
        self.sweep()
        row = self.server.recorder.get_machine(session)
        if row is None or row.kind != "stream_send" or row.site != site:
            raise KeyError(session)
        opening = self._opening(session)
        entry = float(opening.get("entry_timeout") or 60.0)
        deadline = self.server.clock.now_us() + round(entry * US)
        if event == "want":
            want, held = int(data.get("want", 0)), int(data.get("held", 0))
            if row.state == "manifest_offered":
                self._fire(session, "want", {"want": want, "held": held})
                if want:
                    self._fire(session, "start", None, deadline_us=deadline)
        elif event == "resume":
            if row.state in ("manifest_offered", "want_known", "transferring"):
                self._fire(session, "interrupt", {"reason": f"{site} restarted"})
            self._fire(session, "resume", {"want": int(data.get("want", 0))}, deadline_us=deadline)
        elif event == "ack":
            self._fire(session, "ack", {"chunks": int(data.get("chunks", 0)), "bytes": int(data.get("bytes", 0)),
                                        "acked": int(data.get("acked", 0))}, deadline_us=deadline)
        elif event == "complete":
            moved, chunks, skipped = int(data.get("bytes", 0)), int(data.get("chunks", 0)), int(data.get("skipped", 0))
            # earlier reports may have been lost (the site died before sending them): catch the session up
            state = self.runtime.get(session).state
            if state == "manifest_offered":
                self._fire(session, "want", {"want": chunks, "held": skipped, "late": True})
                if chunks:
                    self._fire(session, "start", None, deadline_us=deadline)
            elif state == "stalled":
                self._fire(session, "resume", {"want": chunks, "late": True}, deadline_us=deadline)
            if self._fire(session, "complete", {"bytes": moved, "chunks": chunks, "skipped": skipped}):
                self._site_done(site, str(opening["task_id"]), session, row.job_id, moved)
        elif event == "fail":
            self._fire(session, "fail", {"reason": str(data.get("reason", "the site gave up"))[:500]})
        else:
            raise ValueError(event)
        return self.runtime.get(session).state

    def _opening(self, machine_id: str) -> dict[str, Any]:
        """The data a machine was created with."""
        for event in self.server.recorder.read(machine_id=machine_id):
            return dict(event.data) if isinstance(event.data, dict) else {}
        return {}

    def _site_done(self, site: str, task_id: str, session: str, job_id: str | None, moved: int) -> None:
        td = f"td:{task_id}"
        if self.runtime.get(td).state != "sending":
            return
        prefix = session.rsplit(":", 1)[0] + ":"  # tss:<client task>: — this site's sessions of this task
        known = self._by_share.get(prefix)
        if known is not None:  # the sessions handed out by this process: no scan of the job's sessions
            states = [self.runtime.get(m).state for m in known]
        else:  # after a restart
            states = [r.state for r in self.server.recorder.machines(kind="stream_send", job_id=job_id)
                      if r.machine_id.startswith(prefix)]
        if any(state != "completed" for state in states):
            return  # another payload of this task is still on its way to the site
        self._by_share.pop(prefix, None)  # this share is done; a long-lived server keeps no trace of it
        self._fire(td, "received", {"site": site, "bytes": moved, "skipped": moved == 0})
        data = self._opening(td)
        done = {e.data["site"] for e in self.server.recorder.read(machine_id=td)
                if e.trigger == "received" and isinstance(e.data, dict)}
        if done >= set(data.get("sites") or ()) and self._fire(td, "release", {"sites": len(done)}):
            self._unpin(task_id)

    def figures(self, task_id: str) -> dict[str, Any] | None:
        """The reference's per-round counters for one task: sent, skipped, start, released, missing sites."""
        td = f"td:{task_id}"
        events = list(self.server.recorder.read(machine_id=td))
        if not events:
            return None
        received = [e.data for e in events if e.trigger == "received" and isinstance(e.data, dict)]
        sites = set(events[0].data.get("sites") or ()) if isinstance(events[0].data, dict) else set()
        last = events[-1]
        return {"task_id": task_id, "round": events[0].round, "start_sending_us": events[0].ts_us,
                "num_task_data_sent": sum(1 for r in received if not r.get("skipped")),
                "num_task_skipped": sum(1 for r in received if r.get("skipped")),
                "state": last.dest, "released_us": last.ts_us if last.dest != "sending" else None,
                "missing": sorted(sites - {str(r["site"]) for r in received})}
