"""The public API is what ``engine.__all__`` says, and every name in it resolves."""

from __future__ import annotations

import engine

EXPECTED = {
    "AuthError", "TaskError", "InvalidEventData", "ClientDisconnected", "HttpError", "RemoteError", "TransportError",
    "Chart", "ChartError", "ChartRegistry", "ChartState", "ChartTransition", "ChartValidationError",
    "Clock", "ConcurrencyConflict", "ConfigError", "Durability", "EngineError", "EventRecorder",
    "GuardRejected", "LeaseHeld", "LogCorrupted", "MachineRow", "MachineState", "ManualClock",
    "MemoryRecorder", "NewEvent", "NondeterminismError", "RecoveryReport", "Runtime", "SchemaError",
    "Settings", "SqlRecorder", "StateTimeout", "StoreError", "StoredEvent", "SystemClock",
    "TransitionRejected", "UnknownMachine", "__version__", "load_chart", "load_charts",
    "open_recorder", "parse_chart",
}


def test_all_is_pinned() -> None:
    assert set(engine.__all__) == EXPECTED
    assert len(engine.__all__) == len(set(engine.__all__))


def test_every_exported_name_resolves() -> None:
    for name in engine.__all__:
        assert getattr(engine, name) is not None, name


def test_errors_form_one_tree() -> None:
    for name in engine.__all__:
        obj = getattr(engine, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, engine.EngineError), name
