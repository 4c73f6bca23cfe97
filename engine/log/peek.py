"""Counting a SQLite log's events with the standard library's driver, without the SQL layer.

``fedlog simulate`` reads each site's counts from its local log once the sites stop;
opening a log through ``open_recorder`` would import SQLAlchemy (~0.2 s of CPU) and take
the log's lease for a one-line aggregate. This reads the ``events`` table as the schema
(``engine.log.schema``) defines it, read-only.
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

__all__ = ["count_triggers"]


def count_triggers(path: str | Path, kind: str) -> dict[str, int]:
    """Events of machines of ``kind`` per trigger in the SQLite log at ``path`` (empty: no such events)."""
    uri = Path(path).resolve().as_uri() + "?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
        rows = db.execute('SELECT "trigger", count(*) FROM events WHERE kind = ? GROUP BY "trigger"',
                          (kind,)).fetchall()
    return {str(trigger): int(n) for trigger, n in rows}
