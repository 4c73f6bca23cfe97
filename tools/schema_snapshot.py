"""Write ``migrations/sqlite_head.json``: the DDL of an empty SQLite log upgraded by Alembic to HEAD.

A fresh SQLite log is created from this snapshot instead of replaying every migration
(``engine.log.migrate._create_from_snapshot``). Run it after adding a migration (and
moving ``migrate.HEAD``); ``tests/log/test_migrations.py`` fails until it is current.

Usage: ``python tools/schema_snapshot.py``.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from engine.log import migrate
from engine.resources import data_dir


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "head.db"
        migrate.upgrade(f"sqlite:///{db}")
        snapshot = migrate.sqlite_snapshot(f"sqlite:///{db}")
    out = data_dir("migrations") / migrate.SQLITE_SNAPSHOT
    out.write_text(json.dumps(snapshot, indent=1) + "\n")
    print(f"wrote {out} ({len(snapshot['statements'])} statements, revision {snapshot['revision']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
