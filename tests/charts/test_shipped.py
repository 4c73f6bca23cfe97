"""The shipped charts: every kind of DESIGN.md, faithful to the reference semantics.

The first tests pin each chart's shape where the semantics demand it; the last ones
drive the charts through the real runtime so their timeouts (fixed and ``from_data``)
are shown to fire where the descriptions say.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from engine.charts.loader import load_charts
from engine.charts.model import Chart
from engine.charts.registry import ChartRegistry
from engine.clock import ManualClock
from engine.log.memory import MemoryRecorder
from engine.machines.runtime import Runtime

KINDS = {"job", "task", "client_task", "stream_send", "stream_receive", "swarm_round", "site", "workflow", "audit",
         "site_task", "aux", "task_data"}


def moves(chart: Chart) -> set[tuple[str, str, str]]:
    return {(t.source, t.trigger, t.dest) for t in chart.transitions}


def terminals(chart: Chart) -> set[str]:
    return {name for name, s in chart.states.items() if s.terminal}


def test_every_kind_is_shipped_and_documented(charts: ChartRegistry) -> None:
    assert set(charts.kinds()) == KINDS
    for chart in charts:
        assert chart.version == 1, chart.name
        assert chart.description.strip(), chart.name
        for state in chart.states.values():
            assert state.description.strip(), f"{chart.name}.{state.name} has no description"
    # The default directory is what load_charts() reads when given none.
    assert load_charts().kinds() == charts.kinds()


def test_task(charts: ChartRegistry) -> None:
    task = charts["task"]
    assert task.initial == "created"
    assert terminals(task) == {"completed", "timed_out", "errored", "cancelled", "aborted", "client_dead"}
    for how in ("broadcast", "send", "relay"):
        assert ("created", how, "standing") in moves(task)
    standing = task.states["standing"].timeout
    assert standing is not None and (standing.from_data, standing.trigger) == ("timeout", "timeout")
    wait = task.states["min_received"].timeout
    assert wait is not None
    assert (wait.from_data, wait.trigger) == ("wait_time_after_min_received", "wait_elapsed")
    assert {("standing", "min_reached", "min_received"), ("min_received", "wait_elapsed", "completed"),
            ("standing", "complete", "completed"), ("min_received", "complete", "completed"),
            ("standing", "timeout", "timed_out"), ("min_received", "timeout", "timed_out"),
            ("standing", "targets_dead", "client_dead")} <= moves(task)
    # Dropped results and relay/send progress are recorded without changing state.
    assert {("standing", "drop_result", "standing"), ("min_received", "drop_result", "min_received"),
            ("standing", "advance", "standing")} <= moves(task)
    assert all(t.dest == "aborted" for t in task.transitions if t.trigger == "abort")
    assert {t.source for t in task.transitions if t.trigger == "abort"} == set(task.states) - terminals(task)


def test_client_task(charts: ChartRegistry) -> None:
    ct = charts["client_task"]
    assert ct.initial == "assigned"
    assert terminals(ct) == {"result_received", "timed_out", "cancelled", "client_dead"}
    # A re-send is a self-transition of sent; the only way into sent from elsewhere is `send`.
    assert ("sent", "resend", "sent") in moves(ct)
    assert {(s, t) for s, t, d in moves(ct) if d == "sent"} == {("assigned", "send"), ("sent", "resend")}
    assert ("sent", "result", "result_received") in moves(ct)
    assert ct.legal["assigned"] == ("cancel", "send", "site_dead", "timeout")
    timers = {name: s.timeout.from_data for name, s in ct.states.items() if s.timeout is not None}
    assert timers == {"assigned": "task_assignment_timeout", "sent": "task_result_timeout"}


@pytest.mark.parametrize("kind", ["stream_send", "stream_receive"])
def test_streams(charts: ChartRegistry, kind: str) -> None:
    chart = charts[kind]
    assert chart.initial == "opened"
    assert terminals(chart) == {"completed", "failed", "aborted"}
    path = [("opened", "offer", "manifest_offered"), ("manifest_offered", "want", "want_known"),
            ("want_known", "start", "transferring"), ("transferring", "complete", "completed")]
    assert set(path) <= moves(chart)
    assert ("transferring", "ack", "transferring") in moves(chart)
    # Resume returns into transferring; nothing leads back to the start (not a new session).
    assert ("stalled", "resume", "transferring") in moves(chart)
    assert not [m for m in moves(chart) if m[2] in ("opened", "manifest_offered")
                and m[0] not in ("opened",)]
    assert ("want_known", "complete", "completed") in moves(chart)  # nothing wanted
    entry = chart.states["transferring"].timeout
    stall = chart.states["stalled"].timeout
    assert entry is not None and (entry.from_data, entry.seconds) == ("entry_timeout", 60.0)
    assert stall is not None and stall.from_data == "resume_timeout"
    assert ("transferring", "timeout", "stalled") in moves(chart)
    assert ("stalled", "timeout", "failed") in moves(chart)
    # The overall stream_timeout: `expire` fails the session from any live state.
    assert {s for s, t, d in moves(chart) if t == "expire" and d == "failed"} == set(chart.states) - terminals(chart)


def test_swarm_round(charts: ChartRegistry) -> None:
    sw = charts["swarm_round"]
    trainer = ["learn_task_received", "training", "requesting_permission", "permitted", "uploading", "submitted",
               "done"]
    triggers = ["train", "trained", "permit", "upload", "submit", "round_closed"]
    assert {(a, t, b) for a, t, b in zip(trainer[:-1], triggers, trainer[1:], strict=True)} <= moves(sw)
    aggregator = {("learn_task_received", "gather", "gathering"), ("gathering", "min_reached", "min_received"),
                  ("min_received", "wait_elapsed", "aggregating"), ("gathering", "all_received", "aggregating"),
                  ("gathering", "timeout", "aggregating"), ("aggregating", "aggregated", "selecting_best"),
                  ("selecting_best", "scatter", "scattering"), ("scattering", "scattered", "next_round_sent"),
                  ("selecting_best", "finalize", "distributing"), ("distributing", "distributed", "final_sent"),
                  ("gathering", "grant", "gathering"), ("gathering", "accept", "gathering")}
    assert aggregator <= moves(sw)
    gather = sw.states["gathering"].timeout
    wait = sw.states["min_received"].timeout
    assert gather is not None and gather.from_data == "learn_task_timeout"
    assert wait is not None and (wait.from_data, wait.seconds) == ("wait_time_after_min_resps_received", 10.0)
    permission = sw.states["requesting_permission"].timeout
    assert permission is not None and permission.from_data == "request_to_submit_result_max_wait"
    # Aggregator replacement: a new aggregator takes over, trainers re-ask, the old one is superseded.
    assert ("learn_task_received", "take_over", "gathering") in moves(sw)
    for state in ("permitted", "uploading", "submitted"):
        assert (state, "aggregator_replaced", "requesting_permission") in moves(sw)
    assert ("gathering", "replaced", "superseded") in moves(sw)


def test_site(charts: ChartRegistry) -> None:
    site = charts["site"]
    assert site.initial == "registered"
    assert {("registered", "connect", "active"), ("active", "heartbeat", "active"),
            ("active", "timeout", "missing"), ("missing", "timeout", "dead"),
            ("missing", "reconnect", "active"), ("dead", "reconnect", "active")} <= moves(site)
    assert terminals(site) == {"removed"}
    assert site.states["dead"].timeout is None


# -- the charts in the real runtime: timers land where the descriptions say ----------------


@pytest.fixture
def runtime(charts: ChartRegistry, clock: ManualClock) -> Iterator[Runtime]:
    rt = Runtime(MemoryRecorder(), charts, clock=clock, writer="test", run_timers=False)
    try:
        yield rt
    finally:
        rt.close()


def test_task_timeout_comes_from_the_scheduling_event(runtime: Runtime, clock: ManualClock) -> None:
    task = runtime.create("task", machine_id="t1")
    standing = runtime.fire("t1", "broadcast", {"timeout": 30, "min_responses": 2})
    assert standing.deadline_us == clock.now_us() + 30_000_000 and task.deadline_us is None
    clock.advance(29.999)
    assert runtime.run_due_timers() == 0
    clock.advance(0.001)
    assert runtime.run_due_timers() == 1
    assert runtime.get("t1").state == "timed_out"


def test_task_without_timeout_stands_until_completed(runtime: Runtime, clock: ManualClock) -> None:
    runtime.create("task", machine_id="t2")
    assert runtime.fire("t2", "broadcast", {"timeout": 0}).deadline_us is None
    waiting = runtime.fire("t2", "min_reached", {"wait_time_after_min_received": 10})
    assert waiting.state == "min_received" and waiting.deadline_us == clock.now_us() + 10_000_000
    assert runtime.fire("t2", "drop_result", {"site": "s3", "reason": "duplicate"}).deadline_us == waiting.deadline_us
    clock.advance(10)
    assert runtime.run_due_timers() == 1
    assert runtime.get("t2").state == "completed"


def test_client_task_resend_keeps_the_result_deadline(runtime: Runtime, clock: ManualClock) -> None:
    runtime.create("client_task", machine_id="ct")
    sent = runtime.fire("ct", "send", {"task_result_timeout": 5})
    clock.advance(3)
    again = runtime.fire("ct", "resend", {"send_count": 2})
    assert (again.state, again.deadline_us, again.version) == ("sent", sent.deadline_us, 3)
    clock.advance(2)
    assert runtime.run_due_timers() == 1
    assert runtime.get("ct").state == "timed_out"


def test_site_goes_missing_then_dead_then_reconnects(runtime: Runtime, clock: ManualClock) -> None:
    runtime.create("site", machine_id="site-1")
    runtime.fire("site-1", "connect")
    clock.advance(30)
    # Each heartbeat re-arms the overdue deadline explicitly.
    beat = runtime.fire("site-1", "heartbeat", deadline_us=clock.now_us() + 60_000_000)
    clock.advance(59)
    assert runtime.run_due_timers() == 0
    clock.advance(1)
    assert runtime.run_due_timers() == 1 and runtime.get("site-1").state == "missing"
    assert beat.deadline_us == clock.now_us()
    clock.advance(60)
    assert runtime.run_due_timers() == 1 and runtime.get("site-1").state == "dead"
    assert runtime.get("site-1").deadline_us is None
    back = runtime.fire("site-1", "reconnect", {"heartbeat_timeout": 15})
    assert back.state == "active" and back.deadline_us == clock.now_us() + 15_000_000


def test_stream_stalls_and_resumes_in_the_same_session(runtime: Runtime, clock: ManualClock) -> None:
    runtime.create("stream_send", machine_id="s1", data={"stream_timeout": 3600})
    runtime.fire("s1", "offer", {"manifest": "b3:abc"})
    runtime.fire("s1", "want", {"want": 12})
    runtime.fire("s1", "start", {"entry_timeout": 20})
    runtime.fire("s1", "ack", {"acked": 4}, deadline_us=clock.now_us() + 20_000_000)
    clock.advance(20)
    assert runtime.run_due_timers() == 1 and runtime.get("s1").state == "stalled"
    resumed = runtime.fire("s1", "resume", {"want": 8, "entry_timeout": 20})
    assert resumed.machine_id == "s1" and resumed.state == "transferring"
    assert runtime.fire("s1", "complete").state == "completed"
