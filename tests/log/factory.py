"""Building blocks for the event log tests: events written by hand, fresh databases."""

from __future__ import annotations

from typing import Any

from engine.log.recorder import NewEvent

#: a plausible "now" with a non-zero microsecond part, so truncation would show
T0 = 1_700_000_000_123_456

#: ``source`` default: None for a creation, the previous state otherwise
AUTO: Any = object()


def ev(
    machine_id: str,
    version: int,
    dest: str = "running",
    *,
    source: str | None = AUTO,
    kind: str = "job",
    trigger: str | None = None,
    terminal: bool = False,
    ts_us: int | None = None,
    writer: str = "test",
    chart_version: int = 1,
    **extra: Any,
) -> NewEvent:
    """A ``NewEvent`` for ``machine_id`` at ``version``, with sensible defaults.

    ``source`` defaults to None for version 1 and to ``"s{version-1}"`` otherwise;
    ``ts_us`` defaults to ``T0 + version`` so every event has its own time.
    """
    if source is AUTO:
        source = None if version == 1 else f"s{version - 1}"
    return NewEvent(
        machine_id=machine_id,
        kind=kind,
        chart_version=chart_version,
        version=version,
        trigger=trigger or ("create" if version == 1 else f"t{version}"),
        source=source,
        dest=dest,
        terminal=terminal,
        ts_us=T0 + version if ts_us is None else ts_us,
        writer=writer,
        **extra,
    )


def chain(machine_id: str, upto: int, **extra: Any) -> list[NewEvent]:
    """Versions 1..upto of one machine, each moving to state ``s{version}``."""
    return [ev(machine_id, v, f"s{v}", **extra) for v in range(1, upto + 1)]
