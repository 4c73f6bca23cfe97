"""Replay a finished job's workflow against its log, offline: does the code still make the same calls?

``fedlog replay DB --job J --workflow`` (and the golden-log tests) run the job's
workflow function again with a controller that answers every call from the log:
tasks are re-attached to their recorded outcomes, ``publish``/``checkpoint`` values
are compared with the recorded ones, ``now``/``random`` return what was recorded. The
first call that differs — a different task, a different published value, a call the
log does not hold, or a return while the log holds more — raises
``NondeterminismError`` naming the call and the recorded event. Nothing is written:
the replay runs on a private copy of a SQLite log (the original is only read).
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path
from typing import Any

import orjson

from engine.charts.loader import load_charts
from engine.clock import ManualClock
from engine.errors import ConfigError, NondeterminismError
from engine.log.sql import open_recorder
from engine.machines.runtime import Runtime
from engine.server.jobspec import JobSpec, resolve_workflow
from engine.tasks import TaskManager
from engine.workflows.controller import Controller, load_replay_log, workflow_machine_id

__all__ = ["ReplayOutcome", "replay_workflow"]


class _Verifying(Controller):
    """A controller that refuses to go past the log: every call must already be recorded."""

    def _next(self) -> int:
        i = super()._next()
        if i > self._log.last_call:
            raise NondeterminismError(f"call {i} (beyond the {self._log.last_call} calls the log holds)",
                                      "the recorded run ended there")
        return i


class ReplayOutcome:
    """What the replay found: the calls replayed and the result compared."""

    def __init__(self, job_id: str, calls: int, result: Any) -> None:
        self.job_id = job_id
        self.calls = calls
        self.result = result

    def describe(self) -> str:
        return f"job {self.job_id}: the workflow replayed {self.calls} recorded calls and returned the recorded result"


def _spec(recorder: Any, job_id: str) -> JobSpec:
    for event in recorder.read(machine_id=job_id):
        if event.trigger == "create" and isinstance(event.data, dict):
            return JobSpec.parse(event.data.get("spec"))
    raise ConfigError(f"no job {job_id!r} in this log")


async def _run(db: Path, job_id: str) -> ReplayOutcome:
    recorder = open_recorder(db, lease_holder="fedlog replay --workflow")
    try:
        spec = _spec(recorder, job_id)
        finish = [e for e in recorder.read(machine_id=workflow_machine_id(job_id)) if e.trigger == "finish"]
        if not finish:
            raise ConfigError(f"the workflow of job {job_id!r} has not finished in this log; only a finished run "
                              "can be replayed offline")
        recorded = (finish[-1].data or {}).get("result")
        runtime = Runtime(recorder, load_charts(), clock=ManualClock(finish[-1].ts_us), writer="replay",
                          run_timers=False)
        manager = TaskManager(runtime, clock=runtime.clock)
        chunks = Path(f"{db}.chunks")
        if chunks.is_dir():
            from engine.chunks import LocalChunkStore

            manager.chunk_store = LocalChunkStore(chunks)
        await manager.recover()
        runtime.recover()
        loop = asyncio.get_running_loop()
        ctl = _Verifying(manager, loop, job_id=job_id, log=load_replay_log(recorder, job_id))
        workflow = resolve_workflow(spec.workflow)

        def main() -> Any:
            value = workflow(ctl, **spec.args)
            ctl.check_replay_complete()
            return value

        value = await loop.run_in_executor(None, main)
        await manager.aclose()
        runtime.close()
    finally:
        recorder.close()
    if orjson.loads(orjson.dumps(value)) != recorded:
        raise NondeterminismError(f"the workflow's return value after call {ctl.calls}",
                                  f"the recorded result differs: {str(recorded)[:200]}")
    return ReplayOutcome(job_id, ctl.calls, value)


def replay_workflow(db: str | Path, job_id: str) -> ReplayOutcome:
    """Replay ``job_id``'s workflow against a copy of the SQLite log ``db`` (see the module docstring).

    Raises:
        NondeterminismError: the workflow diverged from the log.
        ConfigError: no such job, or its run did not finish.
    """
    source = Path(db)
    if not source.is_file():
        raise ConfigError(f"no such log file: {source} (offline workflow replay reads a SQLite log)")
    with tempfile.TemporaryDirectory(prefix="fedlog-workflow-replay-") as tmp:
        copy = Path(tmp) / "log.db"
        shutil.copy(source, copy)
        for suffix in ("-wal", "-shm"):
            extra = Path(f"{source}{suffix}")
            if extra.exists():
                shutil.copy(extra, Path(f"{copy}{suffix}"))
        chunks = Path(f"{source}.chunks")
        if chunks.is_dir():
            shutil.copytree(chunks, Path(f"{copy}.chunks"))
        return asyncio.run(_run(copy, job_id))
