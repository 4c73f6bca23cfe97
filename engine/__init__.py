"""fedlog's engine: event-sourced state machines for federated learning.

Import the public API from here; deeper modules may move. ``__all__`` is pinned by
``tests/test_exports.py``.
"""

from __future__ import annotations

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
