"""Fixtures of the workflow tests: a log location on the embedded backends."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(params=["memory", "sqlite"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A log location: MemoryRecorder, then a SQLite file."""
    return "memory" if request.param == "memory" else str(tmp_path / "fedlog.db")
