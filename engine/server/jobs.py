"""Jobs on the server: submitted, deployed, run one after another, each a ``job`` machine.

``JobService`` lives on the server's event loop next to the ``TaskManager``. Jobs run
in submission order, one at a time (the reference's single running job per server
slot). A job's life is its machine (``statecharts/job.yaml``):

- ``submitted``: the checked spec is the creation event's data;
- ``deploying``: waits until ``min_sites`` sites and every required site are active
  (the chart's ``deploy_timeout`` fails it otherwise);
- ``running``: its workflow runs under a ``WorkflowRunner`` (replayed from the log
  after a restart); ``finished`` records the result's hash, ``failed`` the reason
  (the workflow raised, or required sites were lost), ``aborted`` an admin's abort.

Everything the scheduler decides is a transition written before it acts, so a server
killed anywhere picks the same job up again at boot: a running job's workflow is
replayed and re-attaches to its standing task.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from engine.errors import (
    ConcurrencyConflict,
    EngineError,
    NondeterminismError,
    TransitionRejected,
    UnknownMachine,
)
from engine.log.recorder import StoredEvent
from engine.machines.runtime import Runtime
from engine.machines.state import MachineState
from engine.server.jobspec import JobSpec, JobSpecError, resolve_workflow, result_hash
from engine.tasks import TaskManager
from engine.workflows import WorkflowRunner, workflow_machine_id

__all__ = ["JobInfo", "JobService", "UnknownJob"]

logger = logging.getLogger(__name__)

KIND = "job"
_JOB_ID = re.compile(r"^job-(\d+)$")
_TERMINAL = ("finished", "failed", "aborted")
#: machine kinds whose events can change what ``JobService.show`` reports (jobs, workflows, tasks)
_WATCHED_KINDS = (KIND, "workflow", "task", "client_task")


class UnknownJob(UnknownMachine):
    """No job with this id."""


@dataclass(frozen=True)
class JobInfo:
    """A job as ``fedlog job list|show`` reports it."""

    job_id: str
    name: str
    state: str
    spec: dict[str, Any]
    submitted_us: int
    updated_us: int
    #: sites active when the job started (empty before)
    sites: list[str]
    reason: str | None = None
    result_hash: str | None = None
    #: rounds the workflow published
    rounds: int = 0
    #: the standing task of the job: id, name, state, results in, targets
    current_task: dict[str, Any] | None = None

    def as_json(self) -> dict[str, Any]:
        """The JSON the admin routes answer with."""
        return {"job_id": self.job_id, "name": self.name, "state": self.state, "spec": self.spec,
                "submitted_us": self.submitted_us, "updated_us": self.updated_us, "sites": self.sites,
                "reason": self.reason, "result_hash": self.result_hash, "rounds": self.rounds,
                "current_task": self.current_task}

    @functools.cached_property
    def tag(self) -> str:
        """A short digest of everything ``as_json`` shows: equal tags, nothing to report."""
        return hashlib.blake2b(orjson.dumps(self.as_json(), option=orjson.OPT_SORT_KEYS), digest_size=8).hexdigest()


def _job_number(job_id: str) -> int:
    found = _JOB_ID.match(job_id)
    return int(found.group(1)) if found else 0


class JobService:
    """Accepts jobs and runs them in order on the task manager's loop.

    Args:
        manager: the task manager (and through it the runtime and the log).
        sites: the provisioned site names (the federation).
    """

    def __init__(self, manager: TaskManager, sites: list[str]) -> None:
        self.manager = manager
        self.runtime: Runtime = manager.runtime
        self.recorder = manager.recorder
        self.sites = sorted(sites)
        self._changed = asyncio.Event()
        self._runner: WorkflowRunner | None = None
        self._running_job: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._submit_lock = asyncio.Lock()
        for state in ("deploying", *_TERMINAL):
            self.runtime.on_enter(KIND, state, self._job_effect)
        manager.add_site_listener(self._site_changed)
        #: events set when anything ``show`` reports may have changed (``watch`` waits on them)
        self._watchers: set[asyncio.Event] = set()
        for kind in _WATCHED_KINDS:
            for state in self.runtime.charts.get(kind).states:
                self.runtime.on_enter(kind, state, self._progress_effect)

    # -- effects from the runtime (timer thread or loop) ---------------------------------

    def _job_effect(self, _rt: Runtime, _event: StoredEvent, _state: MachineState, _redriven: bool) -> None:
        self._poke()

    def _on_loop(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` on the service's loop, from any thread (effects run where the event was
        committed: the loop, a workflow thread, the runtime's timer thread)."""
        loop = self._loop
        if loop is None:
            return
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            callback()
        else:
            loop.call_soon_threadsafe(callback)

    def _poke(self) -> None:
        """Wake the scheduler from any thread."""
        self._on_loop(self._changed.set)

    def _site_changed(self, site: str, state: str) -> None:
        self._changed.set()

    def _progress_effect(self, _rt: Runtime, _event: StoredEvent, _state: MachineState, _redriven: bool) -> None:
        """Wake the admins watching a job (an event of a job, its workflow or its tasks was recorded)."""
        if self._watchers:
            self._on_loop(self._wake_watchers)

    def _wake_watchers(self) -> None:
        for event in self._watchers:
            event.set()

    # -- admin API ---------------------------------------------------------------------------

    async def submit(self, raw: Any) -> JobInfo:
        """Check and store a job; it runs after the jobs before it. Raises JobSpecError (nothing stored)."""
        spec = JobSpec.parse(raw, known_sites=self.sites)
        async with self._submit_lock:
            numbers = [_job_number(row.machine_id) for row in self.recorder.machines(kind=KIND)]
            job_id = f"job-{max(numbers, default=0) + 1}"
            await self.runtime.create_async(KIND, machine_id=job_id, job_id=job_id, data={"spec": spec.as_json()})
        self._changed.set()
        return self.show(job_id)

    def list(self) -> list[JobInfo]:
        """Every job, oldest first."""
        rows = sorted(self.recorder.machines(kind=KIND), key=lambda r: (_job_number(r.machine_id), r.machine_id))
        return [self.show(row.machine_id, detail=False) for row in rows]

    def show(self, job_id: str, *, detail: bool = True) -> JobInfo:
        """One job with its progress; ``UnknownJob`` if there is none."""
        row = self.recorder.get_machine(job_id) if isinstance(job_id, str) else None
        if row is None or row.kind != KIND:
            raise UnknownJob(job_id)
        events = list(self.recorder.read(machine_id=job_id))
        spec = (events[0].data or {}).get("spec", {})
        sites: list[str] = []
        reason = digest = None
        for event in events[1:]:
            data = event.data or {}
            if event.trigger == "start":
                sites = list(data.get("sites", []))
            elif event.trigger in ("fail", "abort"):
                reason = str(data.get("reason", event.trigger))
            elif event.trigger == "timeout":
                reason = (f"deployment timed out: fewer than min_sites={spec.get('min_sites')} sites (or not every "
                          f"required site) became active within deploy_timeout={spec.get('deploy_timeout')} s")
            elif event.trigger == "finish":
                digest = data.get("result_hash")
        rounds, current = (self._progress(job_id) if detail else (0, None))
        return JobInfo(job_id, str(spec.get("name", "")), row.state, spec, row.created_us, row.updated_us,
                       sites, reason, digest, rounds, current)

    async def watch(self, job_id: str, seen: str | None, wait: float) -> JobInfo:
        """``show(job_id)`` once its ``tag`` differs from ``seen``, or after ``wait`` seconds.

        The long poll behind ``GET /v1/jobs/{id}?wait=&seen=``: a watcher (``fedlog job
        submit --wait``, ``fedlog simulate``) asks again only when there is something new,
        instead of making the server rebuild the job's progress from the log ten times a
        second. Any recorded event of a job, workflow, task or site's share of a task
        wakes it; ``show`` then decides whether what it reports changed.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        woken = asyncio.Event()
        self._watchers.add(woken)  # before the first look: a change after it still wakes us
        try:
            while True:
                woken.clear()
                info = self.show(job_id)
                left = deadline - loop.time()
                if info.tag != seen or left <= 0 or info.state in _TERMINAL:
                    return info
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken.wait(), left)
        finally:
            self._watchers.discard(woken)

    def _progress(self, job_id: str) -> tuple[int, dict[str, Any] | None]:
        rounds = set()
        for event in self.recorder.read(machine_id=workflow_machine_id(job_id)):
            data = event.data or {}
            if event.trigger == "record" and data.get("op") == "publish":
                rounds.add(data.get("round", data.get("call")))
        current = None
        for task_id in self.manager.standing_task_ids():
            if task_id.startswith(f"{job_id}."):
                current = self.manager.task_progress(task_id)
        return len(rounds), current

    async def abort(self, job_id: str, reason: str = "aborted by admin") -> JobInfo:
        """Abort a job that has not ended (its standing tasks end ABORTED)."""
        info = self.show(job_id, detail=False)
        if info.state in _TERMINAL:
            raise TransitionRejected(job_id, KIND, info.state, "abort", [])
        if self._running_job == job_id and self._runner is not None:
            await self._runner.abort(reason)
        await self._fire(job_id, "abort", {"reason": reason})
        return self.show(job_id)

    # -- the scheduler -----------------------------------------------------------------------

    def start(self) -> None:
        """Run the scheduler on the current loop (call after the manager's and runtime's recover)."""
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._schedule_forever(), name="fedlog-jobs")

    async def close(self) -> None:
        """Stop scheduling; a running workflow thread is stopped without recording an end."""
        self._closing = True
        self._changed.set()
        if self._runner is not None:
            await self._runner.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    def _next_job(self) -> str | None:
        live = [row.machine_id for row in self.recorder.machines(kind=KIND, live_only=True)]
        return min(live, key=lambda j: (_job_number(j), j)) if live else None

    async def _schedule_forever(self) -> None:
        while not self._closing:
            self._changed.clear()
            job_id = self._next_job()
            if job_id is None:
                await self._changed.wait()
                continue
            try:
                await self._drive(job_id)
            except Exception as exc:  # noqa: BLE001 - one job's failure must not stop the server
                logger.exception("job %s: the scheduler failed", job_id)
                if not self._closing and not self.runtime.get(job_id).terminal:
                    await self._fire(job_id, "fail", {"reason": f"server error: {type(exc).__name__}: {exc}"})

    async def _drive(self, job_id: str) -> None:
        """Move ``job_id`` one step on (or wait for something to change)."""
        state = self.runtime.get(job_id).state
        spec = JobSpec.parse(self.show(job_id, detail=False).spec)
        if state == "submitted":
            await self._fire(job_id, "deploy", {"deploy_timeout": spec.deploy_timeout})
        elif state == "deploying":
            active = [s for s in self.sites if self.manager.site_state(s) == "active"]
            missing_required = [s for s in spec.required_sites if s not in active]
            if len(active) >= spec.min_sites and not missing_required:
                await self._fire(job_id, "start", {"sites": active})
            else:
                await self._changed.wait()
        elif state == "running":
            await self._run(job_id, spec)

    async def _run(self, job_id: str, spec: JobSpec) -> None:
        try:
            workflow = resolve_workflow(spec.workflow)
        except JobSpecError as exc:
            await self._fire(job_id, "fail", {"reason": str(exc)})
            return
        runner = WorkflowRunner(self.manager, workflow, job_id=job_id, args=spec.args)
        self._runner, self._running_job = runner, job_id
        try:
            await runner.start()
            result_task = asyncio.ensure_future(runner.result())
            while not result_task.done():
                self._changed.clear()
                lost = self._lost_sites(job_id, spec)
                if lost is not None or self.runtime.get(job_id).terminal:
                    result_task.cancel()
                    if lost is not None:
                        await runner.abort(lost)
                        await self._fire(job_id, "fail", {"reason": lost})
                    return
                changed = asyncio.ensure_future(self._changed.wait())
                await asyncio.wait({result_task, changed}, return_when=asyncio.FIRST_COMPLETED)
                changed.cancel()
            try:
                result = result_task.result()
            except NondeterminismError as exc:
                # the log is kept as it is so that a corrected workflow can be recovered
                logger.error("job %s: %s", job_id, exc)
                await self._fire(job_id, "fail", {"reason": f"NondeterminismError: {exc}"})
                return
            except EngineError as exc:
                if not self.runtime.get(job_id).terminal:
                    await self._fire(job_id, "fail", {"reason": str(exc)})
                return
            except Exception as exc:  # noqa: BLE001 - the workflow's own exception is the job's reason
                if not self.runtime.get(job_id).terminal:
                    await self._fire(job_id, "fail", {"reason": f"{type(exc).__name__}: {exc}"})
                return
            if not self.runtime.get(job_id).terminal:
                await self._fire(job_id, "finish", {"result_hash": result_hash(result)})
        finally:
            if self._closing:
                await runner.close()
            self._runner = self._running_job = None

    def _lost_sites(self, job_id: str, spec: JobSpec) -> str | None:
        """Why the job can no longer run (required sites dead, too few sites left), or None."""
        dead_required = [s for s in spec.required_sites if self.manager.site_state(s) in ("dead", "removed")]
        if dead_required:
            return f"required site(s) {', '.join(dead_required)} dead"
        alive = [s for s in self.sites if self.manager.site_state(s) not in ("dead", "removed")]
        if len(alive) < spec.min_sites:
            return f"only {len(alive)} site(s) alive, the job needs min_sites={spec.min_sites}"
        return None

    async def _fire(self, job_id: str, trigger: str, data: dict[str, Any]) -> None:
        try:
            await self.runtime.fire_async(job_id, trigger, data)
        except (TransitionRejected, ConcurrencyConflict):
            # the deployment timer (the runtime's timer thread) may end the job first
            if not self.runtime.get(job_id).terminal:
                raise
        self._changed.set()

    async def result(self, job_id: str) -> Any:
        """The finished job's result as its workflow recorded it (None before it finished)."""
        for event in self.recorder.read(machine_id=workflow_machine_id(job_id)):
            if event.trigger == "finish":
                return (event.data or {}).get("result")
        return None
