"""Clean logs for the history tests, written by the real Runtime, with snapshots.

``write_log`` drives a few ``job`` machines (shipped chart) and ``gauge`` machines
(a test chart with rounds, sites and a timeout, in two versions) through their
lifecycles with a manual clock, one second apart. After every action it records a
snapshot: the last sequence number, the time, and the state of every machine as
the runtime and the projection know it, so a fold up to any point has an
independent answer to be compared with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from engine.charts.loader import load_chart, parse_chart
from engine.charts.model import Chart
from engine.charts.registry import ChartRegistry
from engine.clock import ManualClock
from engine.log.recorder import EventRecorder
from engine.log.sql import open_recorder
from engine.machines.runtime import Runtime
from engine.machines.state import MachineState
from engine.resources import data_dir

GAUGE_V1 = """\
name: gauge
version: 1
description: a round of measurements at one site
initial: idle
states:
  idle:
    description: waiting
  measuring:
    timeout: 30
  done:
    terminal: true
  lost:
    terminal: true
transitions:
  - {trigger: measure, source: idle, dest: measuring}
  - {trigger: rest, source: measuring, dest: idle}
  - {trigger: timeout, source: measuring, dest: lost}
  - {trigger: finish, source: [idle, measuring], dest: done}
"""

# version 2 renames "rest" to "pause": an event written as "rest" is legal only under v1
GAUGE_V2 = GAUGE_V1.replace("version: 1", "version: 2").replace("trigger: rest", "trigger: pause")

US = 1_000_000


def job_chart() -> Chart:
    """The shipped ``job`` chart alone."""
    return load_chart(data_dir("statecharts") / "job.yaml")


def gauge(version: int = 1) -> Chart:
    """The ``gauge`` test chart at ``version`` (1 or 2)."""
    return parse_chart(GAUGE_V1 if version == 1 else GAUGE_V2, f"gauge.v{version}.yaml")


def registry(*gauge_versions: int) -> ChartRegistry:
    """``job`` plus the given ``gauge`` versions (default: both)."""
    return ChartRegistry([job_chart(), *(gauge(v) for v in (gauge_versions or (1, 2)))])


def write_charts(directory: Path, *gauge_versions: int) -> Path:
    """Write ``job`` and the given ``gauge`` versions as YAML files for ``--charts``."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "job.yaml").write_text((data_dir("statecharts") / "job.yaml").read_text())
    for v in gauge_versions or (1, 2):
        (directory / f"gauge.v{v}.yaml").write_text(GAUGE_V1 if v == 1 else GAUGE_V2)
    return directory


@dataclass
class Snapshot:
    """The log and every machine's state right after one action."""

    seq: int
    ts_us: int
    states: dict[str, MachineState]


@dataclass
class WrittenLog:
    """What ``write_log`` wrote: machine ids in creation order, snapshots, the event count."""

    machines: list[str] = field(default_factory=list)
    snapshots: list[Snapshot] = field(default_factory=list)

    @property
    def final(self) -> Snapshot:
        """The snapshot after the last action."""
        return self.snapshots[-1]


def drive(recorder: EventRecorder) -> WrittenLog:
    """Drive job and gauge machines on ``recorder``; return ids and snapshots.

    Machines: ``job-1`` finished (it had a deploy deadline on the way), ``job-2``
    deploying with a deadline, ``job-3`` aborted, ``job-4`` submitted; ``gauge-a``
    (site a, rounds 1..2) done with one "rest" written under gauge v1 and the rest under
    v2; ``gauge-b`` (site b) measuring, armed; ``gauge-c`` lost by its timeout.
    """
    clock = ManualClock()
    out = WrittenLog()

    def snap(runtime: Runtime) -> None:
        clock.advance(1)
        states = {mid: runtime.get(mid) for mid in out.machines}
        out.snapshots.append(Snapshot(recorder.last_seq(), clock.now_us() - US, states))

    # phase 1: only gauge v1 is known, so gauge events are written under v1
    with Runtime(recorder, registry(1), clock=clock, run_timers=False, writer="test") as rt:
        for mid in ("job-1", "job-2", "job-3", "job-4"):
            rt.create("job", machine_id=mid, job_id="J1")
            out.machines.append(mid)
            snap(rt)
        rt.create("gauge", machine_id="gauge-a", job_id="J1", round=1, site="a")
        out.machines.append("gauge-a")
        snap(rt)
        for mid, trigger, data in [
            ("job-1", "deploy", {"deploy_timeout": 60}),
            ("job-2", "deploy", None),
            ("gauge-a", "measure", None),
            ("job-1", "start", None),
            ("gauge-a", "rest", None),
            ("job-3", "abort", {"by": "admin"}),
        ]:
            rt.fire(mid, trigger, data)
            snap(rt)
    # phase 2: gauge v2 ships; new gauge events are written under it
    with Runtime(recorder, registry(1, 2), clock=clock, run_timers=False, writer="test") as rt:
        for mid, site in (("gauge-b", "b"), ("gauge-c", "c")):
            rt.create("gauge", machine_id=mid, job_id="J1", round=1, site=site)
            out.machines.append(mid)
            snap(rt)
        rt.fire("gauge-a", "measure", round=2)
        snap(rt)
        rt.fire("gauge-b", "measure")
        snap(rt)
        rt.fire("gauge-c", "measure")
        snap(rt)
        rt.fire("job-1", "finish", {"result": "ok"})
        snap(rt)
        rt.fire("gauge-a", "finish")
        snap(rt)
        clock.advance(60)
        # gauge-b's deadline is 30 s after its "measure", like gauge-c's: keep b alive by
        # pausing and measuring again after c's timer fired
        rt.fire("gauge-b", "pause")
        snap(rt)
        assert rt.run_due_timers() == 1  # gauge-c times out
        snap(rt)
        rt.fire("gauge-b", "measure")
        snap(rt)
    return out


def write_log(target: str) -> WrittenLog:
    """Write the standard clean log at ``target`` (a path or URL) and close it."""
    with open_recorder(target) as recorder:
        return drive(recorder)
