"""Event data the log cannot hold exactly is refused per caller, before the group commit."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest

from engine.clock import ManualClock
from engine.errors import InvalidEventData
from engine.log.sql import open_recorder
from engine.machines.runtime import Runtime
from tests.machines.support import registry, snapshot


@pytest.mark.parametrize(
    ("data", "path"),
    [
        ({"loss": math.nan}, "data.loss"),
        ({"m": {"x": [1.0, math.inf]}}, "data.m.x[1]"),
        ({"big": 2**70}, "data.big"),
        ({"k": {1: "a"}}, "data.k[1]"),
        ({"obj": object()}, "data.obj"),
    ],
)
def test_unstorable_data_is_refused_and_nothing_is_written(
    sqlite_path: str, clock: ManualClock, data: dict[str, Any], path: str
) -> None:
    rec = open_recorder(sqlite_path)
    rt = Runtime(rec, registry(), clock=clock, run_timers=False)
    try:
        job = rt.create("job")
        before = snapshot(rec)
        with pytest.raises(InvalidEventData) as info:
            rt.fire(job.machine_id, "deploy", data)
        assert info.value.path == path
        assert info.value.machine_id == job.machine_id
        assert snapshot(rec) == before
        with pytest.raises(InvalidEventData):
            rt.create("job", data=data)
        assert snapshot(rec) == before
    finally:
        rt.close()
        rec.close()


def test_a_bad_caller_does_not_fail_the_others_in_its_batch(sqlite_path: str, clock: ManualClock) -> None:
    rec = open_recorder(sqlite_path)
    rt = Runtime(rec, registry(), clock=clock, run_timers=False)

    async def main() -> list[Any]:
        ids = [(await rt.create_async("job")).machine_id for _ in range(8)]
        calls = [rt.fire_async(mid, "deploy", {"n": i}) for i, mid in enumerate(ids)]
        calls.insert(3, rt.fire_async(ids[0], "abort", {"bad": math.nan}))
        return await asyncio.gather(*calls, return_exceptions=True)

    try:
        outcomes = asyncio.run(main())
        assert isinstance(outcomes[3], InvalidEventData)
        good = outcomes[:3] + outcomes[4:]
        assert all(not isinstance(o, BaseException) and o.state == "deploying" for o in good)
    finally:
        rt.close()
        rec.close()
