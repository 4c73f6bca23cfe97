"""``fedlog db upgrade|current|check``: the plain functions and the CLI over them."""

from __future__ import annotations

import argparse
import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, pool, text

from engine import cli
from engine.commands import db as db_command
from engine.log import migrate
from engine.log.target import describe, to_url


@pytest.fixture(autouse=True)
def _keep_root_logging() -> Iterator[None]:
    """``cli.main`` configures logging (it is the entry point); undo that after each test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def head() -> str:
    from alembic.script import ScriptDirectory

    revision = ScriptDirectory.from_config(migrate.alembic_config()).get_current_head()
    assert revision is not None
    return revision


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def sql(url: str, statement: str) -> None:
    engine = create_engine(to_url(url), poolclass=pool.NullPool)
    try:
        with engine.begin() as conn:
            conn.execute(text(statement))
    finally:
        engine.dispose()


def test_functions_directly(sql_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    where = describe(to_url(sql_url))
    assert db_command.cmd_current(argparse.Namespace(db=sql_url)) == 0
    assert capsys.readouterr().out == f"{where}: revision none (empty database) (behind head {head()})\n"
    assert db_command.cmd_upgrade(argparse.Namespace(db=sql_url, revision="head")) == 0
    assert capsys.readouterr().out == f"{where}: upgraded empty -> {head()}\n"
    assert db_command.cmd_check(argparse.Namespace(db=sql_url)) == 0
    assert capsys.readouterr().out == f"{where}: schema matches (revision {head()})\n"


def test_upgrade_current_check_through_the_cli(sql_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    where = describe(to_url(sql_url))
    assert run(capsys, "db", "upgrade", sql_url) == (0, f"{where}: upgraded empty -> {head()}\n", "")
    assert run(capsys, "db", "upgrade", sql_url) == (0, f"{where}: already at revision {head()}\n", "")
    assert run(capsys, "db", "current", sql_url) == (0, f"{where}: revision {head()} (up to date)\n", "")
    assert run(capsys, "db", "check", sql_url) == (0, f"{where}: schema matches (revision {head()})\n", "")


def test_check_fails_on_a_database_that_is_behind(sql_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    where = describe(to_url(sql_url))
    assert run(capsys, "db", "upgrade", sql_url, "--revision", "0001")[0] == 0
    status, out, _ = run(capsys, "db", "current", sql_url)
    assert (status, out) == (0, f"{where}: revision 0001 (behind head {head()})\n")
    status, out, _ = run(capsys, "db", "check", sql_url)
    assert status == 1
    assert "'0001'" in out and out.rstrip().endswith(f"run: fedlog db upgrade {where}")
    assert run(capsys, "db", "upgrade", sql_url)[:2] == (0, f"{where}: upgraded 0001 -> {head()}\n")
    assert run(capsys, "db", "check", sql_url)[0] == 0


def test_check_fails_on_an_empty_database(sql_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    where = describe(to_url(sql_url))
    status, out, _ = run(capsys, "db", "check", sql_url)
    assert status == 1
    assert out == f"fedlog db check: the database {where} has no fedlog schema yet; run: fedlog db upgrade {where}\n"


def test_check_lists_differences(sql_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, "db", "upgrade", sql_url)
    sql(sql_url, "DROP INDEX ix_events_job_id_seq")
    status, out, _ = run(capsys, "db", "check", sql_url)
    assert status == 1
    assert "schema differs from this fedlog's metadata" in out and "ix_events_job_id_seq" in out


def test_newer_database(sql_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, "db", "upgrade", sql_url)
    sql(sql_url, "UPDATE alembic_version SET version_num = '0099_newer'")
    status, out, _ = run(capsys, "db", "current", sql_url)
    assert status == 0 and "revision 0099_newer (newer than this fedlog)" in out
    status, out, err = run(capsys, "db", "upgrade", sql_url)
    assert status == 2 and out == ""
    assert err.startswith("fedlog db: error: ") and "'0099_newer'" in err and "upgrade fedlog" in err
    assert "Traceback" not in err
    status, out, _ = run(capsys, "db", "check", sql_url)
    assert status == 1 and "'0099_newer'" in out
    assert migrate.status(sql_url).current == "0099_newer"  # refused, untouched


@pytest.mark.parametrize("action", ["upgrade", "current", "check"])
def test_bad_locations(action: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cases = [
        ("foo://x", "unsupported database 'foo'"),
        ("postgresql://", "names no database"),
        (f"{tmp_path}/missing/log.db", f"directory {tmp_path}/missing does not exist"),
        (f"postgresql://u@127.0.0.1:{port}/db", f"port {port} failed"),
    ]
    for target, fragment in cases:
        status, out, err = run(capsys, "db", action, target)
        assert (status, out) == (2, ""), (target, out, err)
        assert err.startswith("fedlog db: error: ") and fragment in err, err
        assert "Traceback" not in err


def test_unknown_revision_is_a_config_error(sql_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, "db", "upgrade", sql_url, "--revision", "0001")
    status, out, err = run(capsys, "db", "upgrade", sql_url, "--revision", "nonsense")
    assert (status, out) == (2, "")
    assert err.startswith("fedlog db: error: cannot migrate the database ")
    assert "'nonsense'" in err and "Traceback" not in err
    assert migrate.status(sql_url).current == "0001"
