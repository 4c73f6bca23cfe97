"""Running a workflow function in its own thread, and running it again after a restart.

``WorkflowRunner`` lives on the ``TaskManager``'s event loop. ``start()`` creates the
run's ``workflow`` machine (``<job_id>.workflow``) if the log has none, reads what the
log holds of the run (``load_replay_log``) and starts the workflow thread;
``recover_and_start()`` first rebuilds the manager and the runtime from the log.
When the function returns, its JSON return value is recorded (``finish``); when it
raises, the exception text (``fail``); ``abort()`` records ``abort`` and ends the job's
standing tasks ABORTED. A replay that diverged (``NondeterminismError``) records
nothing: the run stays ``running`` so that the corrected workflow can be recovered.
A run whose machine is already terminal is not run again: ``result()`` answers from
the log.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Mapping
from typing import Any

from engine.errors import EngineError, NondeterminismError, TaskError
from engine.tasks import TaskCompletionStatus, TaskManager
from engine.tasks.spec import as_json
from engine.workflows.controller import (
    KIND,
    Controller,
    ReplayLog,
    _Stopped,
    load_replay_log,
    workflow_machine_id,
)

__all__ = ["Workflow", "WorkflowRunner"]

#: a workflow: a plain function of the controller and keyword arguments
Workflow = Callable[..., Any]


class WorkflowRunner:
    """Runs ``workflow(ctl, **args)`` for ``job_id`` against ``manager``'s log.

    Args:
        manager: the task manager (its loop is the loop ``start`` runs on).
        workflow: the workflow function.
        job_id: the job; it names the workflow machine and the task ids.
        args: keyword arguments of the workflow (JSON; recorded at creation).
    """

    def __init__(self, manager: TaskManager, workflow: Workflow, *, job_id: str,
                 args: Mapping[str, Any] | None = None) -> None:
        if not isinstance(job_id, str) or not job_id or "/" in job_id:
            raise TaskError("job_id", f"must be a non-empty string without '/', got {job_id!r}")
        self.manager = manager
        self.workflow = workflow
        self.job_id = job_id
        self.args: dict[str, Any] = dict(as_json(dict(args or {}), "args"))
        self.machine_id = workflow_machine_id(job_id)
        self.ctl: Controller | None = None
        self._thread: threading.Thread | None = None
        self._done: asyncio.Future[Any] | None = None
        self._error: BaseException | None = None

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Create the run's machine if needed and start (or replay) the workflow in its thread."""
        if self._done is not None:
            raise EngineError(f"the workflow runner of job {self.job_id!r} was already started")
        loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        recorder = self.manager.recorder
        row = recorder.get_machine(self.machine_id)
        if row is None:
            await self.manager.runtime.create_async(
                KIND, machine_id=self.machine_id, job_id=self.job_id,
                data={"workflow": getattr(self.workflow, "__qualname__", repr(self.workflow)), "args": self.args})
            log = ReplayLog()
        elif row.terminal:
            self._settle_from_log()
            return
        else:
            log = load_replay_log(recorder, self.job_id)
        self.ctl = Controller(self.manager, loop, job_id=self.job_id, log=log)
        self._thread = threading.Thread(target=self._main, args=(loop, self.ctl),
                                        name=f"workflow-{self.job_id}", daemon=True)
        self._thread.start()

    async def recover_and_start(self) -> None:
        """After a restart: rebuild the manager and runtime from the log, then ``start``."""
        await self.manager.recover()
        self.manager.runtime.recover()
        await self.start()

    def _main(self, loop: asyncio.AbstractEventLoop, ctl: Controller) -> None:
        """The workflow thread: run the function, then hand its end to the loop."""
        try:
            value = self.workflow(ctl, **self.args)
            ctl.check_replay_complete()
            end: tuple[str, Any] = ("finish", value)
        except _Stopped:
            return
        except BaseException as exc:  # noqa: BLE001 - whatever the workflow raised is its outcome
            end = ("error", exc)
        finally:
            ctl.close()
        try:
            asyncio.run_coroutine_threadsafe(self._end(*end), loop)
        except RuntimeError:  # the loop closed under us: nothing can be recorded
            return

    async def _end(self, how: str, value: Any) -> None:
        assert self._done is not None
        state = self.manager.runtime.get(self.machine_id)
        try:
            if how == "finish":
                try:
                    result = as_json(value, "result")
                except TaskError as exc:
                    how, value = "error", exc
                else:
                    if not state.terminal:
                        await self.manager.runtime.fire_async(self.machine_id, "finish", {"result": result})
                    self._resolve(result, None)
                    return
            error: BaseException = value
            if not isinstance(error, NondeterminismError) and not state.terminal:
                await self.manager.runtime.fire_async(self.machine_id, "fail",
                                                      {"error": f"{type(error).__name__}: {error}"})
            self._resolve(None, error)
        except Exception as exc:  # noqa: BLE001 - recording the end failed: report that instead
            self._resolve(None, exc)

    def _resolve(self, result: Any, error: BaseException | None) -> None:
        assert self._done is not None
        if self._done.done():
            return
        aborted = self._aborted_reason()
        if aborted is not None:
            error = EngineError(f"the workflow of job {self.job_id!r} was aborted: {aborted}")
        self._error = error
        self._done.set_result(result)
        if self.ctl is not None:
            self.ctl.changed.set()

    def _aborted_reason(self) -> str | None:
        events = [e for e in self.manager.recorder.read(machine_id=self.machine_id) if e.trigger == "abort"]
        return str((events[-1].data or {}).get("reason", "aborted")) if events else None

    def _settle_from_log(self) -> None:
        """Answer ``result()`` for a run the log already ended."""
        last = list(self.manager.recorder.read(machine_id=self.machine_id))[-1]
        data = last.data or {}
        if last.trigger == "finish":
            self._resolve(data.get("result"), None)
        elif last.trigger == "fail":
            self._resolve(None, EngineError(f"the workflow of job {self.job_id!r} failed: {data.get('error')}"))
        else:
            self._resolve(None, None)

    async def result(self) -> Any:
        """The workflow's JSON return value; raises what it raised (or why it failed or was aborted)."""
        if self._done is None:
            raise EngineError(f"the workflow runner of job {self.job_id!r} was not started")
        result = await asyncio.shield(self._done)
        if self._error is not None:
            raise self._error
        return result

    def done(self) -> bool:
        """True once the workflow ended (its end recorded, or diverged)."""
        return self._done is not None and self._done.done()

    async def abort(self, reason: str = "aborted") -> None:
        """Record the abort, end the job's standing tasks ABORTED; later controller calls raise."""
        if self.ctl is not None:
            self.ctl.mark_aborted(reason)
        if not self.manager.runtime.get(self.machine_id).terminal:
            await self.manager.runtime.fire_async(self.machine_id, "abort", {"reason": reason})
        await self.manager.cancel_all_tasks(TaskCompletionStatus.ABORTED, job_id=self.job_id, reason=reason)

    async def close(self) -> None:
        """Stop the workflow thread without recording an end (a shutdown; ``recover_and_start`` resumes)."""
        if self.ctl is not None:
            self.ctl.stop()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        if self._done is not None and not self._done.done():
            self._done.cancel()

    async def next_wait(self, after: int) -> int | None:
        """Once the workflow waits on a task for the ``after + 1``-th time or later, return that count.

        None once the workflow ended. For deterministic drivers (tests, simulations):
        it tells them that the tasks the workflow wants served are scheduled.
        """
        if self.ctl is None:
            return None
        ctl = self.ctl
        while True:
            if self.done():
                return None
            if ctl.waiting and ctl.waits > after:
                return ctl.waits
            ctl.changed.clear()
            await ctl.changed.wait()
