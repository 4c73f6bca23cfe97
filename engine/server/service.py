"""The fedlog server: the event log, the machine runtime, the task manager and jobs behind one app.

``FedServer`` owns everything a server process holds. Building it opens the log and
takes the writer lease (a second server on the same database is refused with
``LeaseHeld`` instead of corrupting it). Its ASGI app's start-up hook is the boot
sequence of DESIGN.md: rebuild the task manager's indexes and the runtime's timers
from the log, make the provisioned sites known, then resume the job that was running
(its workflow is replayed against the log and re-attaches to the standing task).
``boot`` records how long that took, so operators and the recovery benchmark can see
it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import engine
from engine.charts.loader import load_charts
from engine.chunks import ChunkStore, LocalChunkStore, MemoryChunkStore
from engine.chunks.serving import IDLE_S, SERVED_BYTES, ServedChunks
from engine.clock import Clock, SystemClock
from engine.log.recorder import EventRecorder
from engine.log.sql import open_recorder
from engine.machines.runtime import Runtime
from engine.provision import ROLE_SITE
from engine.server.auth import AuditEvent, CredentialStore
from engine.server.aux import AuxHub, aux_router
from engine.server.base import base_router
from engine.server.chunk_routes import ChunkAccess, chunk_router
from engine.server.http import App, Limits
from engine.server.jobs import JobService
from engine.server.jobspec import JobSpec
from engine.server.routes import federation_router
from engine.server.tensor_streamer import TensorServerStreamer, TensorStreamConfig
from engine.swarm.config import STATUS_TOPIC as SWARM_STATUS_TOPIC
from engine.tasks import TaskManager
from engine.workflows.swarm import SwarmStatusBoard

__all__ = ["BootReport", "FedServer", "ServerSettings"]

logger = logging.getLogger(__name__)

#: the machine that holds the audit trail of refused requests
AUDIT_MACHINE = "audit"
WRITER = "server"  # each incarnation writes as "server@<pid>.<start s>" (history: rounds that spanned a restart)


@dataclass(frozen=True)
class ServerSettings:
    """How the server judges sites and tasks (seconds); the reference's defaults unless noted."""

    heartbeat_timeout: float = 60.0
    dead_grace: float = 60.0
    client_dead_grace: float = 30.0
    heartbeat_record_interval: float = 1.0
    limits: Limits = field(default_factory=Limits)
    #: bytes of chunks held for downloads, and seconds without one before they go (engine/chunks/serving.py)
    served_bytes: int = SERVED_BYTES
    served_idle_s: float = IDLE_S


@dataclass
class BootReport:
    """What the boot sequence rebuilt and how long it took."""

    boot_s: float = 0.0
    events: int = 0
    standing_tasks: int = 0
    timers_armed: int = 0
    sites: int = 0
    resumed_job: str | None = None


def open_chunk_store(db: str | Path, directory: str | Path | None) -> ChunkStore:
    """The server's chunk store: ``directory``, else beside a SQLite log (``<db>.chunks``), else
    ``fedlog-chunks`` in the working directory (PostgreSQL); in memory for a memory log."""
    if directory is not None:
        return LocalChunkStore(directory)
    text = str(db)
    if text == "memory":
        return MemoryChunkStore()
    if "://" in text and not text.startswith("sqlite"):
        return LocalChunkStore("fedlog-chunks")
    path = text.split(":///", 1)[-1] if text.startswith("sqlite") else text
    return LocalChunkStore(f"{path}.chunks")


class FedServer:
    """A server over the log at ``db`` for the federation provisioned in ``credentials``.

    Args:
        db: SQLite path or SQLAlchemy URL (``memory`` for tests).
        credentials: the server's provisioned folder (``fedlog provision`` output ``DIR/server``).
        recorder: an already-open log to use instead of ``db`` (tests).
    """

    def __init__(self, db: str | Path, credentials: str | Path, *, settings: ServerSettings | None = None,
                 clock: Clock | None = None, recorder: EventRecorder | None = None,
                 lease_holder: str | None = None, chunks: str | Path | ChunkStore | None = None) -> None:
        self.settings = settings or ServerSettings()
        self.clock = clock or SystemClock()
        self.store = CredentialStore.load(credentials)
        self.site_names = sorted(n for n in self.store.names if self.store.role_of(n) == ROLE_SITE)
        holder = lease_holder or f"fedlog server (pid {os.getpid()})"
        self.recorder = recorder if recorder is not None else open_recorder(db, lease_holder=holder)
        try:
            self.chunks: ChunkStore = chunks if isinstance(chunks, ChunkStore) else open_chunk_store(db, chunks)
            self.chunk_access = ChunkAccess(self.chunks)
            #: chunks being downloaded, held in memory for the sites asking (engine/chunks/serving.py)
            self.served = ServedChunks(self.chunks, self.settings.served_bytes, self.settings.served_idle_s)
            self.writer = f"{WRITER}@{os.getpid()}.{int(time.time())}"
            self.runtime = Runtime(self.recorder, load_charts(), clock=self.clock, writer=self.writer)
            s = self.settings
            self.manager = TaskManager(self.runtime, clock=self.clock, client_dead_grace=s.client_dead_grace,
                                       heartbeat_timeout=s.heartbeat_timeout, dead_grace=s.dead_grace,
                                       heartbeat_record_interval=s.heartbeat_record_interval)
            self.manager.chunk_store = self.chunks
            self.jobs = JobService(self.manager, self.site_names)
        except BaseException:
            if recorder is None:
                self.recorder.close()
            raise
        router = base_router()
        router.include(federation_router())
        router.include(aux_router())
        router.include(chunk_router())
        self.app = App(router, authenticator=self.store, limits=self.settings.limits, audit=self._audit,
                       title="fedlog", version=engine.__version__, on_startup=[self.startup],
                       on_shutdown=[self.shutdown])
        self.app.state = self
        #: aux messages between the job's sites and to the server
        self.aux = AuxHub(self)
        #: the newest swarm round report of each site (sites report as they go; see engine.workflows.swarm)
        self.swarm_status = SwarmStatusBoard()
        self.aux.register_handler(SWARM_STATUS_TOPIC, self.swarm_status.handle)
        #: tensor task data to the sites, recorded per task and site (the TensorServerStreamer role)
        self.tensor_streamer = TensorServerStreamer(self)
        self._stream_configs: dict[str, TensorStreamConfig] = {}
        self.boot = BootReport()
        self.closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._contexts: dict[str, dict[str, Any]] = {}
        self._owns_recorder = recorder is None

    # -- lifecycle ----------------------------------------------------------------------

    async def startup(self) -> None:
        """The boot sequence: recover from the log, know the sites, resume jobs."""
        started = time.perf_counter()
        self._loop = asyncio.get_running_loop()
        recovered = await self.manager.recover()
        report = self.runtime.recover()
        if self.recorder.get_machine(AUDIT_MACHINE) is None:
            await self.runtime.create_async("audit", machine_id=AUDIT_MACHINE)
        for site in self.site_names:
            if self.manager.site_state(site) is None:
                await self.manager.register_site(site)
        self.manager.start()
        self.jobs.start()
        live = [row.machine_id for row in self.recorder.machines(kind="job", live_only=True)]
        for job_id in live:  # payloads sites shared through the relay stay readable by their targets
            self.aux.restore_shares(job_id)
        self.boot = BootReport(time.perf_counter() - started, report.last_seq, recovered.standing,
                               report.timers_armed, len(self.site_names), min(live) if live else None)
        logger.info("boot: %s", self.boot)

    def begin_closing(self) -> None:
        """Answer every waiting long poll now (the process is stopping), before connections drain.

        Called on the server's loop when SIGTERM/SIGINT arrives: the HTTP server waits for
        open requests before the app's shutdown runs, and a long poll would hold it for
        its whole wait.
        """
        self.closing = True
        self.manager._work_changed()
        self.aux.release()

    async def shutdown(self) -> None:
        """Stop the jobs and the task manager; close the log (a restart resumes from it)."""
        self.begin_closing()
        await self.jobs.close()
        await self.manager.aclose()
        self.runtime.close()
        if self._owns_recorder:
            self.recorder.close()
        self.chunks.close()

    # -- what handlers need ---------------------------------------------------------------

    def tensor_stream_config(self, job_id: str | None) -> TensorStreamConfig:
        """The job's TensorServerStreamer settings (the defaults for a task outside any job)."""
        if job_id is None:
            return TensorStreamConfig()
        found = self._stream_configs.get(job_id)
        if found is None:
            try:
                raw = JobSpec.parse(self.jobs.show(job_id, detail=False).spec).tensor_stream
            except Exception:  # noqa: BLE001 - an unknown job streams with the defaults
                raw = None
            found = self._stream_configs[job_id] = TensorStreamConfig.parse(raw)
        return found

    def job_context(self, job_id: str) -> dict[str, Any] | None:
        """What a site needs to run a job's tasks: its executor and its sites."""
        found = self._contexts.get(job_id)
        if found is not None:
            return found
        try:
            info = self.jobs.show(job_id, detail=False)
        except Exception:  # noqa: BLE001 - a task outside any job has no context
            return None
        spec = JobSpec.parse(info.spec)
        context = {"job_id": job_id, "name": spec.name, "executor": spec.executor,
                   "sites": info.sites or list(self.site_names)}
        if info.sites:
            self._contexts[job_id] = context
        return context

    def round_of(self, job_id: str | None, data: Any) -> int | None:
        """The round a task belongs to: its data's ``round`` if it has one, else the rounds published so far."""
        if isinstance(data, dict) and isinstance(data.get("round"), int):
            return int(data["round"])
        if not job_id:
            return None
        try:
            return self.jobs.show(job_id).rounds
        except Exception:  # noqa: BLE001 - not a job's task
            return None

    def _audit(self, event: AuditEvent) -> Awaitable[None] | None:
        """Record a refused request in the audit trail (never a state change of anything else).

        The returned awaitable is waited for before the refusal is answered, so an answered
        refusal is always in the log.
        """
        if self._loop is None or self.closing:
            return None
        data = {"kind": event.kind, "method": event.method, "path": event.path, "route": event.route,
                "identity": event.identity, "role": event.role, "reason": event.reason, "client": event.client}
        return self._record_audit(data)

    async def _record_audit(self, data: dict[str, Any]) -> None:
        await self.runtime.fire_async(AUDIT_MACHINE, "refused", data)
