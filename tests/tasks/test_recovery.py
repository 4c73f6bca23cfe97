"""Close everything mid-task, reopen the same log with a new runtime and manager: the task goes on."""

from __future__ import annotations

import asyncio

from engine.charts.registry import ChartRegistry
from engine.clock import ManualClock
from engine.log.sql import open_recorder
from engine.machines.runtime import Runtime
from engine.tasks import ClientTaskView, SubmissionOutcome, Task, TaskCompletionStatus, TaskManager
from engine.tasks.records import TaskRecord
from engine.tasks.spec import SendOrder
from tests.tasks.support import US, harness

OK = TaskCompletionStatus.OK


def test_a_broadcast_continues_after_a_restart(sql_url: str, charts: ChartRegistry) -> None:
    clock = ManualClock()

    async def before() -> tuple[str, str, str]:
        async with harness(sql_url, charts, clock) as h:
            await h.connect("a", "b", "c")
            tid = await h.manager.broadcast(Task("train", data={"w": 1}, timeout=100), targets=["a", "b", "c"])
            a = await h.take("a")
            assert await h.answer("a", a, {"n": 10}) == "accepted"
            b = await h.take("b")
            return tid, a.client_task_id, b.client_task_id

    tid, a_id, b_id = asyncio.run(before())
    clock.advance(20)  # the server was down for 20 s

    async def after() -> None:
        async with harness(sql_url, charts, clock) as h:
            report = await h.manager.recover()
            assert (report.standing, report.shares_closed) == (1, 0)
            h.runtime.recover()
            assert h.manager.get_num_standing_tasks() == 1
            m = h.manager
            # the result received before the crash counts once
            assert await m.process_submission("a", tid, a_id, {"n": 10}) is SubmissionOutcome.DUPLICATE
            again = await h.take("b")
            assert (again.client_task_id, again.resend, again.send_count, again.data) == (b_id, True, 2, {"w": 1})
            c = await h.take("c")
            assert not c.resend
            await h.answer("b", again, {"n": 20})
            assert h.state(tid) == "standing"
            await h.answer("c", c, {"n": 30})
            outcome = await m.wait(tid)
            assert outcome.status is OK
            assert [(r.site, r.result) for r in outcome.results] == [("a", {"n": 10}), ("b", {"n": 20}),
                                                                       ("c", {"n": 30})]
            assert h.triggers(b_id) == ["create", "send", "resend", "result"]

    asyncio.run(after())


def test_overdue_timers_fire_after_a_restart(sqlite_path: str, charts: ChartRegistry) -> None:
    clock = ManualClock()

    def relay_cb(view: ClientTaskView) -> None:
        view.next_data = {"from": view.site, "value": view.result}

    async def before() -> tuple[str, str]:
        async with harness(sqlite_path, charts, clock) as h:
            await h.connect("a", "b", "c")
            relay = await h.manager.relay(Task("cyclic", data=0, result_received_cb=relay_cb),
                                          targets=["a", "b", "c"], task_assignment_timeout=30)
            await h.answer("a", await h.take("a"), 5)
            timed = await h.manager.broadcast(Task("t", timeout=30), targets=["a", "b"])
            await h.take("a")
            return relay, timed

    relay, timed = asyncio.run(before())
    clock.advance(45)  # down past b's hop (30 s) and the broadcast's timeout, not c's hop (60 s)

    async def after() -> None:
        async with harness(sqlite_path, charts, clock) as h:
            await h.manager.recover()
            h.runtime.recover()
            await h.tick()
            assert h.state(f"{relay}/1") == "timed_out"  # b's hop passed while the server was down
            await h.connect("a", "b", "c")
            c = await h.take("c")
            # the next hop's data came from a's result callback, restored from the log
            assert (c.client_task_id, c.data) == (f"{relay}/2", {"from": "a", "value": 5})
            await h.answer("c", c, 7)
            outcome = await h.manager.wait(relay)
            assert outcome.status is OK and [r.site for r in outcome.results] == ["a", "c"]
            late = await h.manager.wait(timed)
            assert late.status is TaskCompletionStatus.TIMEOUT
            assert h.state(f"{timed}/a") == "timed_out" and h.state(f"{timed}/b") == "timed_out"

    asyncio.run(after())


def test_interrupted_steps_are_finished_by_recovery(sqlite_path: str, charts: ChartRegistry) -> None:
    clock = ManualClock()

    def crash_points() -> None:
        # a broadcast whose shares were never created, and a task that ended with its shares open
        with open_recorder(sqlite_path) as log, Runtime(log, charts, clock=clock, run_timers=False) as rt:
            data = TaskRecord.schedule_data(
                name="half", method="broadcast", targets=["a", "b"], requested_targets=None, min_responses=0,
                wait_time_after_min_received=0, send_order=SendOrder.SEQUENTIAL, task_assignment_timeout=0,
                task_result_timeout=0, dynamic_targets=False, forever=False, timeout=0, data=[1], props={})
            rt.create("task", machine_id="x.t1", data={"name": "half"}, job_id="x")
            rt.fire("x.t1", "broadcast", data)
            rt.create("task", machine_id="x.t2", data={"name": "done"}, job_id="x")
            rt.fire("x.t2", "broadcast", {**data, "name": "done"})
            for site in ("a", "b"):
                rt.create("client_task", machine_id=f"x.t2/{site}", data={"task_id": "x.t2"}, site=site)
            rt.fire("x.t2/a", "send")
            rt.fire("x.t2", "timeout", {"deadline_us": clock.now_us()})
            rt.create("task", machine_id="x.t3", data={"name": "never"}, job_id="x")

    crash_points()

    async def after() -> None:
        async with harness(sqlite_path, charts, clock) as h:
            report = await h.manager.recover()
            assert (report.standing, report.unscheduled, report.shares_closed) == (1, 1, 2)
            h.runtime.recover()
            assert [h.state(f"x.t2/{s}") for s in "ab"] == ["timed_out", "timed_out"]
            await h.connect("a", "b")
            a = await h.take("a")
            assert (a.client_task_id, a.data) == ("x.t1/a", [1])
            await h.answer("a", a, 1)
            await h.answer("b", await h.take("b"), 2)
            assert (await h.manager.wait("x.t1")).status is OK
            assert (await h.manager.wait("x.t2")).status is TaskCompletionStatus.TIMEOUT
            assert await h.manager.abort("shutdown") == 1 and h.state("x.t3") == "aborted"

    asyncio.run(after())


def test_a_site_grace_lost_in_a_crash_is_restored(sqlite_path: str, charts: ChartRegistry) -> None:
    clock = ManualClock()
    with open_recorder(sqlite_path) as log, Runtime(log, charts, clock=clock, run_timers=False) as rt:
        rt.create("site", machine_id="site:a", site="a")
        rt.fire("site:a", "connect", {"heartbeat_timeout": 10})
        overdue = clock.now_us() + 10 * US
        clock.advance(10)
        assert rt.run_due_timers() == 1  # missing, with the chart's 60 s grace: then the crash
    clock.advance(1)

    async def after() -> None:
        async with harness(sqlite_path, charts, clock, dead_grace=15) as h:
            await h.manager.recover()
            h.runtime.recover()  # re-drives the entry effect of missing
            await h.manager.settle()
            row = h.recorder.get_machine("site:a")
            assert row is not None and row.state == "missing" and row.deadline_us == overdue + 15 * US
            await h.tick(14)
            assert h.manager.site_state("a") == "dead"

    asyncio.run(after())


def test_the_timer_thread_drives_the_manager(sqlite_path: str, charts: ChartRegistry) -> None:
    clock = ManualClock()

    async def main() -> None:
        with open_recorder(sqlite_path) as log, Runtime(log, charts, clock=clock) as rt:
            manager = TaskManager(rt, clock=clock)
            manager.start()
            try:
                await manager.client_is_active("a")
                await manager.client_is_active("b")
                timed = await manager.broadcast(Task("t", timeout=10), targets=["b"])
                # min_received: the engine's timer is the 60 s wait, the task's 20 s deadline is the manager's
                waiting = await manager.broadcast(Task("w", timeout=20), targets=["a", "b"], min_responses=1,
                                                  wait_time_after_min_received=60)
                b = await manager.process_task_request("b")
                assert b is not None and b.task_id == timed
                w = await manager.process_task_request("a")
                assert w is not None and w.task_id == waiting
                await manager.process_submission("a", waiting, w.client_task_id, 1)
                clock.advance(10)
                assert (await asyncio.wait_for(manager.wait(timed), 10)).status is TaskCompletionStatus.TIMEOUT
                clock.advance(10)
                outcome = await asyncio.wait_for(manager.wait(waiting), 10)
                assert outcome.status is TaskCompletionStatus.TIMEOUT and len(outcome.results) == 1
            finally:
                await manager.aclose()

    asyncio.run(main())


def test_a_sequential_send_moves_on_while_the_server_is_down(sqlite_path: str, charts: ChartRegistry) -> None:
    clock = ManualClock()

    async def before() -> str:
        async with harness(sqlite_path, charts, clock) as h:
            await h.connect("a", "b", "c")
            return await h.manager.send(Task("t"), targets=["a", "b", "c"], task_assignment_timeout=10)

    tid = asyncio.run(before())
    clock.advance(15)  # a's slot ended while the server was down: b's slot is open

    async def after() -> None:
        async with harness(sqlite_path, charts, clock) as h:
            await h.manager.recover()
            h.runtime.recover()
            await h.tick()
            await h.connect("a", "b", "c")
            assert await h.manager.process_task_request("a") is None
            b = await h.take("b")
            assert b.client_task_id == f"{tid}/b"
            await h.answer("b", b, "ok")
            assert (await h.manager.wait(tid)).result == "ok"

    asyncio.run(after())
