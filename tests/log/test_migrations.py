"""Migrations: the schema they build is the code's metadata, they go down and up again,
an older database is upgraded (or the exact command is named), a newer one refused,
and the readable views render the same timestamps on both dialects."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, inspect, pool, text

from engine.clock import parse_time_us
from engine.errors import SchemaError
from engine.log import migrate
from engine.log.schema import metadata
from engine.log.sql import SqlRecorder, open_recorder
from engine.log.target import describe, to_url
from engine.resources import data_dir
from tests.log.factory import T0, chain, ev

FEDLOG_TABLES = {"events", "machine_states", "writer_lease"}
FEDLOG_VIEWS = {"transitions", "machines", "jobs", "rounds", "tasks", "client_tasks", "streams", "sites"}


@pytest.fixture
def db(sql_url: str) -> Iterator[Engine]:
    engine = create_engine(to_url(sql_url), poolclass=pool.NullPool)
    yield engine
    engine.dispose()


def head() -> str:
    revision = ScriptDirectory.from_config(migrate.alembic_config()).get_current_head()
    assert revision is not None
    return revision


def tables_and_views(engine: Engine) -> tuple[set[str], set[str]]:
    insp = inspect(engine)
    return set(insp.get_table_names()), set(insp.get_view_names())


def write_some(url: str) -> None:
    with SqlRecorder(url) as rec:
        rec.append([*chain("a", 3, job_id="j1", data={"x": 1.5}), ev("b", 1, deadline_us=T0 + 9)])


# -- shape ----------------------------------------------------------------------------


def test_upgrade_from_empty_equals_the_metadata(sql_url: str, db: Engine) -> None:
    assert migrate.status(sql_url).current is None
    st = migrate.upgrade(sql_url)
    assert st.up_to_date and st.current == head()
    assert migrate.check(sql_url) == []
    tables, views = tables_and_views(db)
    assert tables == FEDLOG_TABLES | {"alembic_version"}
    assert tables - {"alembic_version"} == set(metadata.tables)
    assert views == FEDLOG_VIEWS


def test_check_reports_a_schema_that_drifted(sql_url: str, db: Engine) -> None:
    migrate.upgrade(sql_url)
    with db.begin() as conn:
        conn.execute(text("DROP INDEX ix_machine_states_job_id"))
    diffs = migrate.check(sql_url)
    assert diffs and "ix_machine_states_job_id" in str(diffs)


def test_downgrade_to_base_removes_everything_and_up_again(sql_url: str, db: Engine) -> None:
    migrate.upgrade(sql_url)
    write_some(sql_url)
    assert migrate.downgrade(sql_url, "base").current is None
    tables, views = tables_and_views(db)
    assert views == set()
    assert tables <= {"alembic_version"}  # alembic's own bookkeeping, emptied
    if "alembic_version" in tables:
        with db.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 0
    if db.dialect.name == "postgresql":
        with db.connect() as conn:
            leftovers = conn.execute(text(
                "SELECT relname, relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = 'public' AND relname <> 'alembic_version' "
                "AND relname NOT LIKE 'alembic_version%'"
            )).all()
        assert leftovers == []
    migrate.upgrade(sql_url)
    assert migrate.check(sql_url) == []
    write_some(sql_url)


def test_every_revision_goes_down_and_up_with_data(sql_url: str) -> None:
    script = ScriptDirectory.from_config(migrate.alembic_config())
    revisions = [r.revision for r in reversed(list(script.walk_revisions()))]
    assert revisions[0] == "0001" and revisions[-1] == head()
    migrate.upgrade(sql_url)
    write_some(sql_url)
    for target in reversed(revisions[:-1]):
        assert migrate.downgrade(sql_url, target).current == target
    for target in revisions[1:]:
        assert migrate.upgrade(sql_url, target).current == target
    assert migrate.check(sql_url) == []
    with open_recorder(sql_url) as rec:
        assert [e.data for e in rec.read(machine_id="a")] == [{"x": 1.5}] * 3
        assert rec.last_seq() == 4


def test_history_is_one_line() -> None:
    script = ScriptDirectory.from_config(migrate.alembic_config())
    assert script.get_heads() == [head()]
    assert script.get_bases() == ["0001"]
    for rev in script.walk_revisions():
        assert isinstance(rev.down_revision, (str, type(None)))


def test_migrations_import_nothing_from_engine() -> None:
    files = sorted(data_dir("migrations").rglob("*.py"))
    assert any(f.name == "env.py" for f in files) and len(files) >= 2
    for path in files:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(n == "engine" or n.startswith("engine.") for n in names), f"{path} imports {names}"
        assert "__import__" not in path.read_text() and "importlib" not in path.read_text()


# -- older and newer databases ---------------------------------------------------------


def test_older_database_names_the_command_or_is_upgraded(sql_url: str) -> None:
    migrate.upgrade(sql_url, "0001")
    where = describe(to_url(sql_url))
    with pytest.raises(SchemaError) as info:
        open_recorder(sql_url, auto_upgrade=False)
    message = str(info.value)
    assert message.endswith(f"run: fedlog db upgrade {where}")
    assert "'0001'" in message and repr(head()) in message
    assert migrate.status(sql_url).current == "0001"  # refusing changed nothing
    with open_recorder(sql_url, auto_upgrade=True) as rec:
        rec.append_one(ev("a", 1))
    assert migrate.status(sql_url).current == head()
    assert migrate.check(sql_url) == []


def test_empty_database_without_auto_upgrade(sql_url: str, db: Engine) -> None:
    where = describe(to_url(sql_url))
    with pytest.raises(SchemaError) as info:
        open_recorder(sql_url, auto_upgrade=False)
    assert str(info.value) == f"the database {where} has no fedlog schema yet; run: fedlog db upgrade {where}"
    assert tables_and_views(db) == (set(), set())


def test_tables_without_a_revision_are_not_guessed_at(sql_url: str, db: Engine) -> None:
    migrate.upgrade(sql_url)
    with db.begin() as conn:
        conn.execute(text("DELETE FROM alembic_version"))
    where = describe(to_url(sql_url))
    with pytest.raises(SchemaError) as info:
        open_recorder(sql_url, auto_upgrade=False)
    assert "has fedlog tables but no schema revision" in str(info.value)
    assert str(info.value).endswith(f"run: fedlog db upgrade {where}")


@pytest.mark.parametrize("auto_upgrade", [True, False])
def test_newer_database_is_refused(sql_url: str, db: Engine, auto_upgrade: bool) -> None:
    migrate.upgrade(sql_url)
    write_some(sql_url)
    with db.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999_from_the_future'"))
    with pytest.raises(SchemaError) as info:
        open_recorder(sql_url, auto_upgrade=auto_upgrade)
    message = str(info.value)
    assert "'9999_from_the_future'" in message and "newer fedlog" in message
    assert "upgrade fedlog" in message
    with pytest.raises(SchemaError, match="9999_from_the_future"):
        migrate.upgrade(sql_url)
    with pytest.raises(SchemaError, match="9999_from_the_future"):
        migrate.check(sql_url)
    st = migrate.status(sql_url)
    assert (st.current, st.known, st.up_to_date) == ("9999_from_the_future", False, False)
    with db.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM events")).scalar() == 4


# -- readable views --------------------------------------------------------------------

VIEW_TIMES = [0, 1, T0, 1_700_000_000_000_000, 1_700_000_000_999_999, 4_102_444_800_000_001]


def iso(ts_us: int) -> str:
    """The text the views must show: ISO 8601 UTC, always six fractional digits."""
    dt = datetime.fromtimestamp(ts_us // 1_000_000, tz=UTC).replace(microsecond=ts_us % 1_000_000)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def view_rows(url: str) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
    with SqlRecorder(url) as rec:
        for i, ts in enumerate(VIEW_TIMES):
            rec.append([ev(f"m{i}", 1, ts_us=ts, deadline_us=ts + 5), ev(f"m{i}", 2, "s2", ts_us=ts + 7)])
    engine = create_engine(to_url(url), poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            transitions = [tuple(r) for r in conn.execute(text(
                "SELECT seq, at, deadline, machine_id, trigger, source, dest, version FROM transitions ORDER BY seq"
            ))]
            machines = [tuple(r) for r in conn.execute(text(
                "SELECT machine_id, state, version, created, updated, deadline FROM machines ORDER BY machine_id"
            ))]
    finally:
        engine.dispose()
    return transitions, machines


def test_views_show_microsecond_iso_times(sql_url: str) -> None:
    transitions, machines = view_rows(sql_url)
    expected = []
    for i, ts in enumerate(VIEW_TIMES):
        expected.append((2 * i + 1, iso(ts), iso(ts + 5), f"m{i}", "create", None, "running", 1))
        expected.append((2 * i + 2, iso(ts + 7), None, f"m{i}", "t2", "s1", "s2", 2))
    assert transitions == expected
    assert machines == [(f"m{i}", "s2", 2, iso(ts), iso(ts + 7), None) for i, ts in enumerate(VIEW_TIMES)]
    assert [parse_time_us(str(row[1])) for row in transitions[::2]] == VIEW_TIMES


def test_views_read_the_same_on_both_dialects(sqlite_path: str, pg_url: str) -> None:
    assert view_rows(sqlite_path) == view_rows(pg_url)


# -- several openers of one fresh database ----------------------------------------------

OPEN = """
import sys
from engine.log.recorder import NewEvent
from engine.log.sql import open_recorder
with open_recorder(sys.argv[1]) as rec:
    rec.append_one(NewEvent(sys.argv[2], "job", 1, 1, "create", None, "submitted", False, 1, "w"))
print("ok", flush=True)
"""


def test_threads_opening_a_fresh_database_at_once(sql_url: str) -> None:
    """Alembic's proxies are process-global: concurrent upgrades once hung in SQLite."""
    n = 4
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []

    def opener(i: int) -> None:
        try:
            barrier.wait(timeout=60)
            with open_recorder(sql_url) as rec:
                rec.append_one(ev(f"m{i}", 1))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=opener, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "an opener hung"
    assert errors == []
    assert migrate.check(sql_url) == []
    with open_recorder(sql_url) as rec:
        assert sorted(m.machine_id for m in rec.machines()) == [f"m{i}" for i in range(n)]


def test_processes_opening_a_fresh_database_at_once(sql_url: str) -> None:
    n = 3
    procs = [
        subprocess.Popen([sys.executable, "-c", OPEN, sql_url, f"p{i}"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(n)
    ]
    outcomes = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * n, [err for _, err in outcomes]
    assert migrate.check(sql_url) == []
    with open_recorder(sql_url) as rec:
        assert sorted(m.machine_id for m in rec.machines()) == [f"p{i}" for i in range(n)]


def test_the_fast_path_head_is_alembics_head() -> None:
    """Opening an up-to-date log skips Alembic by comparing with ``migrate.HEAD``: a new migration must move it."""
    script = ScriptDirectory.from_config(migrate.alembic_config())
    assert script.get_current_head() == migrate.HEAD


def test_opening_an_up_to_date_log_does_not_import_alembic(tmp_path: Path) -> None:
    db = tmp_path / "log.db"
    with open_recorder(db):
        pass  # created and upgraded (Alembic runs)
    probe = ("import sys; from engine.log.sql import open_recorder\n"
             f"with open_recorder({str(db)!r}): pass\n"
             "print('alembic' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def _master(path: Path) -> list[tuple[str, str, str, str | None]]:
    engine = create_engine(f"sqlite:///{path}", poolclass=pool.NullPool)
    with engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name")
        out = [tuple(r) for r in rows]
    engine.dispose()
    return out  # type: ignore[return-value]


def test_the_shipped_sqlite_snapshot_is_what_alembic_makes(tmp_path: Path) -> None:
    """A fresh SQLite log is made from ``migrations/sqlite_head.json``: it must be Alembic's HEAD schema.

    After adding a migration, run ``python tools/schema_snapshot.py``.
    """
    migrated = tmp_path / "migrated.db"
    migrate.upgrade(f"sqlite:///{migrated}")
    shipped = json.loads((data_dir("migrations") / migrate.SQLITE_SNAPSHOT).read_text())
    assert shipped == migrate.sqlite_snapshot(f"sqlite:///{migrated}"), "run: python tools/schema_snapshot.py"
    fresh = tmp_path / "fresh.db"
    with open_recorder(fresh):
        pass  # made from the snapshot
    assert _master(fresh) == _master(migrated)
    assert migrate.status(f"sqlite:///{fresh}").up_to_date
    assert migrate.check(f"sqlite:///{fresh}") == []


def test_a_fresh_sqlite_log_is_made_without_alembic(tmp_path: Path) -> None:
    probe = ("import sys; from engine.log.sql import open_recorder\n"
             f"with open_recorder({str(tmp_path / 'new.db')!r}) as rec: rec.machines()\n"
             "print('alembic' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_a_stale_or_missing_snapshot_falls_back_to_alembic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(migrate, "_snapshot", [])  # as when the file is not of HEAD
    fresh = tmp_path / "fresh.db"
    with open_recorder(fresh):
        pass
    assert migrate.check(f"sqlite:///{fresh}") == []
    assert migrate.status(f"sqlite:///{fresh}").up_to_date


def test_the_snapshot_never_touches_a_database_that_is_not_empty(tmp_path: Path) -> None:
    db = tmp_path / "other.db"
    engine = create_engine(f"sqlite:///{db}", poolclass=pool.NullPool)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE theirs (x INTEGER)")
    assert migrate._create_from_snapshot(engine) is False
    assert [r[1] for r in _master(db)] == ["theirs"]
    engine.dispose()
