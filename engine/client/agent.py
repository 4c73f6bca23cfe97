"""The site agent (``fedlog client``): poll for work, run the executor, submit, survive crashes.

Each assignment is a ``site_task`` machine in the site's own SQLite log (machine id =
the client-task id, which is also the submission's idempotency key):

1. ``received`` is written before the executor runs;
2. the executor's JSON result is written (``compute``) before it is submitted;
3. the server's answer is written (``acknowledge`` or ``drop``).

So a site killed after computing re-submits the stored result at restart instead of
computing it again, and a server that died while a result was in flight gets the
same result again (counted once: the server treats a repeat as a duplicate). An
unreachable server is retried with exponential backoff (with jitter, capped);
a credential the server refuses stops the agent with a clear error, since retrying
cannot fix it. A long-running executor keeps the site alive with heartbeats.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.charts.loader import load_charts
from engine.chunks import ChunkStore, LocalChunkStore, MemoryChunkStore
from engine.client.api import SiteApi
from engine.client.engine import SiteEngine
from engine.client.executor import Executor, SiteTask, load_callable
from engine.client.payloads import SitePayloads
from engine.clock import Clock, SystemClock
from engine.errors import AuthError, ConfigError, RemoteError, TransportError
from engine.log.recorder import EventRecorder
from engine.log.sql import open_recorder
from engine.machines.runtime import Runtime
from engine.tasks.spec import as_json

__all__ = ["AgentStats", "Backoff", "SiteAgent"]

logger = logging.getLogger(__name__)

KIND = "site_task"


@dataclass
class Backoff:
    """Exponential backoff with full jitter: the n-th retry waits up to ``min(cap, base * 2**n)``."""

    base: float = 0.05
    cap: float = 5.0
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0

    def next_delay(self) -> float:
        """The delay before the next retry (and count the attempt)."""
        ceiling = min(self.cap, self.base * (2 ** min(self.attempt, 30)))
        self.attempt += 1
        return float(ceiling / 2 + self.rng.uniform(0, ceiling / 2))

    def reset(self) -> None:
        """The server answered: start again from ``base``."""
        self.attempt = 0


@dataclass
class AgentStats:
    """What the agent did (tests and ``fedlog client`` report it)."""

    executed: int = 0
    submitted: int = 0
    resubmitted: int = 0
    dropped: int = 0
    failed: int = 0
    reconnects: int = 0


class SiteAgent:
    """Serves one site: its API client, its local log and the executor(s).

    Args:
        api: the site's routes on the server.
        log: the local log (SQLite path or URL; ``memory`` for tests). A second agent
            on the same log is refused (``LeaseHeld``).
        executor: run this for every job instead of the job's ``executor`` reference
            (simulations that ship a locally defined function).
        poll_wait: seconds a poll may wait for work.
        heartbeat_interval: seconds between heartbeats while an executor runs.
    """

    def __init__(self, api: SiteApi, log: str | Path, *, executor: Executor | None = None,
                 poll_wait: float = 20.0, heartbeat_interval: float = 15.0, backoff: Backoff | None = None,
                 clock: Clock | None = None, engine_factory: Callable[[dict[str, Any]], Any] | None = None,
                 chunks: ChunkStore | None = None) -> None:
        self.api = api
        self.site = api.site
        self.poll_wait = poll_wait
        self.heartbeat_interval = heartbeat_interval
        self.backoff = backoff or Backoff()
        self.stats = AgentStats()
        self._override = executor
        self._executors: dict[str, Executor] = {}
        self._engine_factory = engine_factory or self._default_engine
        self._engines: dict[str, Any] = {}
        #: the assignment the executor is running (``SiteEngine.get_task_assignment``)
        self.current: SiteTask | None = None
        self.stop_event = threading.Event()
        self.recorder: EventRecorder = open_recorder(log, lease_holder=f"fedlog client {self.site}")
        try:
            self.runtime = Runtime(self.recorder, load_charts(), clock=clock or SystemClock(),
                                   writer=f"site:{self.site}", run_timers=False)
            if chunks is None:
                chunks = MemoryChunkStore() if str(log) == "memory" else LocalChunkStore(f"{log}.chunks")
            self.chunks = chunks
            self.payloads = SitePayloads(api, chunks, self.runtime)
        except BaseException:
            self.recorder.close()
            raise

    # -- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Stop engines, flush and close the local log."""
        for engine in self._engines.values():  # stop all first: their polls end together
            getattr(engine, "stop", lambda: None)()
        for engine in self._engines.values():
            getattr(engine, "close", lambda: None)()
        self.runtime.close()
        self.recorder.close()
        self.chunks.close()

    def stop(self) -> None:
        """Ask ``run`` (and the aux threads of the site's engines) to return after the current step."""
        self.stop_event.set()
        for engine in list(self._engines.values()):
            getattr(engine, "stop", lambda: None)()

    def run(self, *, max_assignments: int | None = None, idle_exit: float | None = None) -> AgentStats:
        """Serve until ``stop()`` (or ``max_assignments`` handled, or ``idle_exit`` seconds without work).

        First re-submits results computed before a crash but never acknowledged.
        """
        self.resubmit_pending()
        handled = 0
        idle_since: float | None = None
        while not self.stop_event.is_set():
            answer = self._call(lambda: self.api.poll(self.poll_wait))
            if answer is None:
                continue
            assignment = answer.get("assignment")
            if assignment is None:
                now = time.monotonic()
                idle_since = idle_since if idle_since is not None else now
                if idle_exit is not None and now - idle_since >= idle_exit:
                    break
                continue
            idle_since = None
            self.handle(assignment, answer.get("job") or {})
            handled += 1
            if max_assignments is not None and handled >= max_assignments:
                break
        return self.stats

    # -- one assignment ----------------------------------------------------------------------

    def handle(self, assignment: dict[str, Any], job: dict[str, Any]) -> None:
        """Run (or recall) the result of one assignment and submit it."""
        ct_id = str(assignment["client_task_id"])
        row = self.recorder.get_machine(ct_id)
        if row is None:
            self.runtime.create(KIND, machine_id=ct_id, job_id=assignment.get("job_id"), site=self.site, data={
                "task_id": assignment["task_id"], "name": assignment["name"], "send_count": assignment["send_count"],
                "executor": job.get("executor")})
            state = "received"
        else:
            state = row.state
        if state == "failed":
            self.runtime.fire(ct_id, "retry", {"send_count": assignment["send_count"]})
            state = "received"
        if state == "received":
            if not self._execute(ct_id, assignment, job):
                return
            state = "computed"
        if state == "computed":
            self._submit(ct_id, str(assignment["task_id"]), self._stored_result(ct_id))
        elif state in ("submitted", "dropped"):
            # the server handed out again what it already has: answer with the stored result
            result = self._stored_result(ct_id)
            self._call(lambda: (self.payloads.upload(result, session=ct_id),
                                self.api.submit(str(assignment["task_id"]), ct_id, result)))

    def _execute(self, ct_id: str, assignment: dict[str, Any], job: dict[str, Any]) -> bool:
        try:
            executor = self._executor_for(job)
            task = SiteTask(job_id=str(assignment.get("job_id") or job.get("job_id") or ""),
                            task_id=str(assignment["task_id"]), client_task_id=ct_id, name=str(assignment["name"]),
                            data=self.payloads.fetch(assignment.get("data"), session=ct_id,
                                                     streaming=assignment.get("tensor_stream")),
                            props=dict(assignment.get("props") or {}), site=self.site,
                            job_sites=tuple(sorted(job.get("sites") or ())),
                            send_count=int(assignment.get("send_count", 0)), hop=assignment.get("hop"),
                            engine=self._engine_for(job))
            self.current = task
            try:
                with self._heartbeats():
                    result = as_json(self.payloads.externalize(executor(task)), "the executor's result")
            finally:
                self.current = None
        except Exception as exc:  # noqa: BLE001 - the executor's failure is recorded, the agent goes on
            logger.exception("%s: the executor failed on %s", self.site, ct_id)
            self.runtime.fire(ct_id, "fail", {"error": f"{type(exc).__name__}: {exc}"})
            self.stats.failed += 1
            self.stop_event.wait(self.backoff.next_delay())
            return False
        self.runtime.fire(ct_id, "compute", {"result": result})
        self.stats.executed += 1
        return True

    def _submit(self, ct_id: str, task_id: str, result: Any) -> None:
        answer = None
        attempts = 0

        def upload_and_submit() -> Any:
            self.payloads.upload(result, session=ct_id)  # the chunks the server lacks, then the result
            return self.api.submit(task_id, ct_id, result)

        while answer is None and not self.stop_event.is_set():
            attempts += 1
            answer = self._call(upload_and_submit)
        if answer is None:
            return  # stopping: the result stays `computed` and is re-submitted at the next start
        if attempts > 1:
            self.stats.resubmitted += 1  # the same stored result, sent again after a failed attempt
        outcome = str(answer["outcome"])
        if answer.get("counted"):
            self.runtime.fire(ct_id, "acknowledge", {"outcome": outcome})
            self.stats.submitted += 1
        else:
            self.runtime.fire(ct_id, "drop", {"outcome": outcome})
            self.stats.dropped += 1

    def resubmit_pending(self) -> int:
        """Submit every result computed but never acknowledged (after a crash of either side)."""
        pending = [row for row in self.recorder.machines(kind=KIND, live_only=True) if row.state == "computed"]
        for row in pending:
            first = next(iter(self.recorder.read(machine_id=row.machine_id)))
            task_id = str((first.data or {})["task_id"])
            self._submit(row.machine_id, task_id, self._stored_result(row.machine_id))
            self.stats.resubmitted += 1
        return len(pending)

    def _stored_result(self, ct_id: str) -> Any:
        results = [e.data for e in self.recorder.read(machine_id=ct_id) if e.trigger == "compute"]
        if not results:
            raise ConfigError(f"{ct_id} has no computed result in the local log")
        return (results[-1] or {}).get("result")

    # -- helpers -------------------------------------------------------------------------------

    def _executor_for(self, job: dict[str, Any]) -> Executor:
        if self._override is not None:
            return self._override
        ref = job.get("executor")
        if not isinstance(ref, str):
            raise ConfigError(f"the job {job.get('job_id')!r} names no executor")
        found = self._executors.get(ref)
        if found is None:
            found = self._executors[ref] = load_callable(ref, "executor")
        return found

    def _default_engine(self, job: dict[str, Any]) -> SiteEngine:
        def abort(reason: str) -> None:
            logger.error("%s: the executor aborted the site: %s", self.site, reason)
            self.stop()

        engine = SiteEngine(self.api.transport, self.site, job_id=str(job["job_id"]),
                            job_sites=list(job.get("sites") or ()), assignment_getter=lambda: self.current,
                            abort=abort, poll_wait=min(5.0, self.poll_wait), runtime=self.runtime)
        engine.payloads = self.payloads
        return engine.start()

    def _engine_for(self, job: dict[str, Any]) -> Any:
        job_id = job.get("job_id")
        if not isinstance(job_id, str):
            return None
        engine = self._engines.get(job_id)
        if engine is None:
            engine = self._engines[job_id] = self._engine_factory(job)
        return engine

    def _call(self, fn: Callable[[], Any]) -> Any:
        """Run one request; on a transport failure or a 5xx back off and return None."""
        try:
            result = fn()
        except AuthError:
            raise
        except (TransportError, RemoteError) as exc:
            if isinstance(exc, RemoteError) and exc.status < 500 and exc.status != 429:
                raise
            delay = self.backoff.next_delay()
            self.stats.reconnects += 1
            logger.info("%s: server unavailable (%s); retrying in %.2fs", self.site, exc, delay)
            self.stop_event.wait(delay)
            return None
        self.backoff.reset()
        return result

    def _heartbeats(self) -> _Heartbeats:
        return _Heartbeats(self.api, self.heartbeat_interval)


class _Heartbeats:
    """While the executor runs, a thread sends a heartbeat every ``interval`` seconds."""

    def __init__(self, api: SiteApi, interval: float) -> None:
        self.api = api
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> _Heartbeats:
        if self.interval > 0:
            self._thread = threading.Thread(target=self._beat, name="fedlog-heartbeat", daemon=True)
            self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.api.heartbeat()
            except Exception as exc:  # noqa: BLE001 - a missed heartbeat is not the executor's problem
                logger.info("heartbeat failed: %s", exc)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

