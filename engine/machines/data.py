"""Checking an event's data before it joins a group commit.

Event data is small JSON. It is checked per caller, before queueing, because a value
the log cannot store exactly (NaN, an infinity, a non-string key, an integer beyond
64 bits, an arbitrary object) would otherwise fail the whole batch it was committed
with, and with it every other caller's event in that batch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from engine.errors import InvalidEventData

__all__ = ["check_event_data"]

_INT_MIN = -(2**63)
_INT_MAX = 2**64 - 1


def check_event_data(data: Mapping[str, Any], machine_id: str, trigger: str) -> None:
    """Raise ``InvalidEventData`` naming the first value the log cannot hold exactly."""
    _check(data, "data", machine_id, trigger)


def _check(value: Any, path: str, machine_id: str, trigger: str) -> None:
    if value is None or isinstance(value, bool | str):
        return
    if isinstance(value, int):
        if not _INT_MIN <= value <= _INT_MAX:
            raise InvalidEventData(machine_id, trigger, path, "an integer beyond 64 bits")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidEventData(machine_id, trigger, path, f"{value!r} (JSON has no NaN or infinity)")
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidEventData(machine_id, trigger, f"{path}[{key!r}]", "a non-string key")
            _check(item, f"{path}.{key}", machine_id, trigger)
        return
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _check(item, f"{path}[{index}]", machine_id, trigger)
        return
    raise InvalidEventData(machine_id, trigger, path, f"a {type(value).__name__}, which is not JSON")
