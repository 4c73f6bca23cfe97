"""fedlog's engine: event-sourced state machines for federated learning.

Import the public API from here; deeper modules may move. ``__all__`` is pinned by
``tests/test_exports.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.lazy import lazy_names

if TYPE_CHECKING:
    from engine.charts.loader import load_chart, load_charts, parse_chart
    from engine.charts.model import Chart, ChartState, ChartTransition, StateTimeout
    from engine.charts.registry import ChartRegistry
    from engine.clock import Clock, ManualClock, SystemClock
    from engine.config import Durability, Settings
    from engine.errors import (
        AuthError,
        ChartError,
        ChartValidationError,
        ClientDisconnected,
        ConcurrencyConflict,
        ConfigError,
        EngineError,
        GuardRejected,
        HttpError,
        InvalidEventData,
        LeaseHeld,
        LogCorrupted,
        NondeterminismError,
        RemoteError,
        SchemaError,
        StoreError,
        TaskError,
        TransitionRejected,
        TransportError,
        UnknownMachine,
    )
    from engine.log.memory import MemoryRecorder
    from engine.log.recorder import EventRecorder, MachineRow, NewEvent, StoredEvent
    from engine.log.sql import SqlRecorder, open_recorder
    from engine.machines.runtime import RecoveryReport, Runtime
    from engine.machines.state import MachineState

#: public name -> the module defining it, imported on first use (PEP 562): a process that
#: imports one submodule (a site's worker child, say) does not pay for the SQL layer's import
_LAZY = {
    "load_chart": "engine.charts.loader",
    "load_charts": "engine.charts.loader",
    "parse_chart": "engine.charts.loader",
    "Chart": "engine.charts.model",
    "ChartState": "engine.charts.model",
    "ChartTransition": "engine.charts.model",
    "StateTimeout": "engine.charts.model",
    "ChartRegistry": "engine.charts.registry",
    "Clock": "engine.clock",
    "ManualClock": "engine.clock",
    "SystemClock": "engine.clock",
    "Durability": "engine.config",
    "Settings": "engine.config",
    "AuthError": "engine.errors",
    "ChartError": "engine.errors",
    "ChartValidationError": "engine.errors",
    "ClientDisconnected": "engine.errors",
    "ConcurrencyConflict": "engine.errors",
    "ConfigError": "engine.errors",
    "EngineError": "engine.errors",
    "GuardRejected": "engine.errors",
    "HttpError": "engine.errors",
    "InvalidEventData": "engine.errors",
    "LeaseHeld": "engine.errors",
    "LogCorrupted": "engine.errors",
    "NondeterminismError": "engine.errors",
    "RemoteError": "engine.errors",
    "SchemaError": "engine.errors",
    "StoreError": "engine.errors",
    "TaskError": "engine.errors",
    "TransitionRejected": "engine.errors",
    "TransportError": "engine.errors",
    "UnknownMachine": "engine.errors",
    "MemoryRecorder": "engine.log.memory",
    "EventRecorder": "engine.log.recorder",
    "MachineRow": "engine.log.recorder",
    "NewEvent": "engine.log.recorder",
    "StoredEvent": "engine.log.recorder",
    "SqlRecorder": "engine.log.sql",
    "open_recorder": "engine.log.sql",
    "RecoveryReport": "engine.machines.runtime",
    "Runtime": "engine.machines.runtime",
    "MachineState": "engine.machines.state",
}

__version__ = "0.1.0"

__all__ = [
    "AuthError",
    "Chart",
    "ChartError",
    "ChartRegistry",
    "ChartState",
    "ChartTransition",
    "ChartValidationError",
    "ClientDisconnected",
    "Clock",
    "ConcurrencyConflict",
    "ConfigError",
    "Durability",
    "EngineError",
    "EventRecorder",
    "GuardRejected",
    "HttpError",
    "InvalidEventData",
    "LeaseHeld",
    "LogCorrupted",
    "MachineRow",
    "MachineState",
    "ManualClock",
    "MemoryRecorder",
    "NewEvent",
    "NondeterminismError",
    "RecoveryReport",
    "RemoteError",
    "Runtime",
    "SchemaError",
    "Settings",
    "SqlRecorder",
    "StateTimeout",
    "StoreError",
    "StoredEvent",
    "SystemClock",
    "TaskError",
    "TransitionRejected",
    "TransportError",
    "UnknownMachine",
    "__version__",
    "load_chart",
    "load_charts",
    "open_recorder",
    "parse_chart",
]


__getattr__, __dir__ = lazy_names("engine", _LAZY, globals())
