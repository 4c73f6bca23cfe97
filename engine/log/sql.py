"""The SQL recorder: SQLite (embedded default) and PostgreSQL, one code path.

Statements are SQLAlchemy Core constructs compiled once per dialect; the hot path
runs them on the driver's own connection (stdlib ``sqlite3`` / psycopg 3) because
per-row ORM-level overhead would cost more than the database does.

An append batch is one transaction. The fast path updates the projection with
``executemany`` and checks the row counts: every event must move its machine from
exactly ``version - 1``. If any does not (a lost race), the transaction is rolled
back and the batch is re-run event by event so that only the losers fail, each
with a ``ConcurrencyConflict`` that names the version actually found.
"""

from __future__ import annotations

import fcntl
import logging
import operator
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import (
    Engine,
    bindparam,
    create_engine,
    event,
    func,
    insert,
    literal,
    select,
    update,
)
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql import ClauseElement

from engine.clock import format_us
from engine.config import Durability
from engine.errors import ConcurrencyConflict, ConfigError, EngineError, LeaseHeld, StoreError
from engine.log import migrate
from engine.log.recorder import (
    AppendResult,
    EventRecorder,
    MachineRow,
    NewEvent,
    StoredEvent,
    chained_conflict,
)
from engine.log.schema import events, machine_states, writer_lease
from engine.log.target import describe, is_sqlite, sqlite_path, to_url

__all__ = ["SqlRecorder", "open_recorder"]

logger = logging.getLogger(__name__)

#: advisory-lock key for the writer lease on PostgreSQL ("fedlog" in ASCII, folded)
_PG_LEASE_KEY = 0x6665646C6F67
_LEASE_NAME = "writer"
_SQLITE_SYNC = {Durability.FULL: "FULL", Durability.NORMAL: "NORMAL", Durability.OFF: "OFF"}

_EVENT_COLUMNS = [c.name for c in events.c if c.name != "seq"]
_STATE_COLUMNS = [c.name for c in machine_states.c]
_READ_COLUMNS = [
    "seq", "machine_id", "kind", "chart_version", "version", "trigger", "source", "dest",
    "ts_us", "writer", "data", "deadline_us", "job_id", "round", "site",
]


class _Prepared:
    """A Core statement compiled for one dialect, with its parameter order."""

    def __init__(self, stmt: ClauseElement, dialect: Any) -> None:
        compiled = stmt.compile(dialect=dialect)
        self.sql = str(compiled)
        positiontup = getattr(compiled, "positiontup", None)
        self.positional = bool(positiontup)
        self.order: list[str] = list(positiontup or [])
        getter = operator.itemgetter(*self.order) if len(self.order) > 1 else None
        self._getter = getter

    def params(self, values: dict[str, Any]) -> Any:
        if not self.positional:
            return values
        if self._getter is not None:
            return self._getter(values)
        return tuple(values[name] for name in self.order)


class SqlRecorder(EventRecorder):
    """Event log in a SQL database; see the module docstring for the append protocol."""

    def __init__(
        self,
        target: str | Path | URL,
        *,
        durability: Durability = Durability.FULL,
        auto_upgrade: bool = True,
        lease_holder: str | None = None,
    ) -> None:
        self.url = to_url(target)
        self.target = describe(self.url)
        self.durability = durability
        self._sqlite = is_sqlite(self.url)
        self._lock = threading.Lock()
        self._lease_fd: int | None = None
        self._closed = False
        path = sqlite_path(self.url)
        if self._sqlite and path is None:
            raise ConfigError("an in-memory SQLite database cannot be shared; use a file path or MemoryRecorder")
        if path is not None and not path.parent.is_dir():
            raise ConfigError(f"cannot create the database {path}: directory {path.parent} does not exist")
        self.engine = self._make_engine()
        try:
            migrate.ensure_schema(self.engine, auto_upgrade=auto_upgrade)
        except DBAPIError as exc:
            self.engine.dispose()
            raise StoreError(f"cannot open the database {self.target}: {exc.orig}") from None
        except BaseException:
            self.engine.dispose()
            raise
        dialect = self.engine.dialect
        self._prepare(dialect)
        self._writer: Any = None
        try:
            if self._sqlite and lease_holder is not None:
                self._acquire_lease(lease_holder)  # before touching the file as a writer
            self._writer = self._connect_writer()
            if not self._sqlite and lease_holder is not None:
                self._acquire_lease(lease_holder)
        except BaseException as exc:
            if self._writer is not None:
                self._writer.close()
            self._release_lease()
            self.engine.dispose()
            if isinstance(exc, Exception) and not isinstance(exc, EngineError):
                raise StoreError(f"cannot open the database {self.target}: {exc}") from exc
            raise

    # -- set-up -----------------------------------------------------------------

    def _make_engine(self) -> Engine:
        if self._sqlite:
            engine = create_engine(self.url, connect_args={"check_same_thread": False})
            sync = _SQLITE_SYNC[self.durability]

            @event.listens_for(engine, "connect")
            def _pragmas(dbapi_conn: Any, _record: Any) -> None:
                _sqlite_pragmas(dbapi_conn, sync)

            return engine
        try:
            return create_engine(self.url, pool_pre_ping=True)
        except Exception as exc:  # bad driver options surface here
            raise ConfigError(f"cannot use database {self.target}: {exc}") from None

    def _prepare(self, dialect: Any) -> None:
        ins_mod = sqlite_dialect if self._sqlite else pg_dialect
        self._ins_state = _Prepared(
            ins_mod.insert(machine_states)
            .values({c: bindparam(c) for c in _STATE_COLUMNS})
            .on_conflict_do_nothing(index_elements=["machine_id"]),
            dialect,
        )
        ms = machine_states.c
        self._upd_state = _Prepared(
            update(machine_states)
            .where(ms.machine_id == bindparam("b_machine_id"), ms.version == bindparam("b_expected"))
            .values(
                state=bindparam("state"),
                version=bindparam("version"),
                chart_version=bindparam("chart_version"),
                terminal=bindparam("terminal"),
                deadline_us=bindparam("deadline_us"),
                # job and site are fixed at creation; leaving them out of SET keeps the
                # job index untouched on the hot path
                round=func.coalesce(bindparam("round"), ms.round),
                updated_us=bindparam("updated_us"),
            ),
            dialect,
        )
        ins_event = insert(events).values({c: bindparam(c) for c in _EVENT_COLUMNS})
        if not self._sqlite:
            ins_event = ins_event.returning(events.c.seq)
        self._ins_event = _Prepared(ins_event, dialect)
        self._version_of = _Prepared(
            select(ms.version).where(ms.machine_id == bindparam("machine_id")), dialect
        )
        self._last_rowid = _Prepared(select(func.last_insert_rowid()), dialect) if self._sqlite else None
        if not self._sqlite:
            self._try_lock = _Prepared(select(func.pg_try_advisory_lock(bindparam("key"))), dialect)
            self._lease_holder = _Prepared(
                select(writer_lease.c.holder).where(writer_lease.c.name == bindparam("name")), dialect)
            self._lease_upsert = _Prepared(
                pg_dialect.insert(writer_lease)
                .values(name=bindparam("name"), holder=bindparam("holder"), acquired_us=bindparam("acquired_us"))
                .on_conflict_do_update(index_elements=["name"], set_={
                    "holder": bindparam("holder"), "acquired_us": bindparam("acquired_us")}),
                dialect)
        # The positional (SQLite) statements get their parameters as tuples built
        # straight from the event; check the compiled order is the one those builders
        # assume, and fall back to the generic dict path if SQLAlchemy ever differs.
        self._fast_state_params = self._ins_state.order == _STATE_COLUMNS and self._upd_state.order == [
            "chart_version", "state", "version", "terminal", "deadline_us", "round", "updated_us",
            "b_machine_id", "b_expected"]
        self._fast_event_params = self._ins_event.order == _EVENT_COLUMNS

    def _connect_writer(self) -> Any:
        if self._sqlite:
            path = sqlite_path(self.url)
            conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
            sync = _SQLITE_SYNC[self.durability]
            _sqlite_pragmas(conn, sync)
            return conn
        import psycopg

        pg_conn: Any = psycopg.connect(self._pg_conninfo(), autocommit=False)
        conn = pg_conn
        if self.durability is not Durability.FULL:
            conn.execute("SET synchronous_commit = off")
            conn.commit()
        return conn

    def _pg_conninfo(self) -> str:
        url = self.url.set(drivername="postgresql")
        return url.render_as_string(hide_password=False)

    # -- writer lease -----------------------------------------------------------

    def _acquire_lease(self, holder: str) -> None:
        who = f"{holder} (pid {os.getpid()} on {socket.gethostname()}, since {format_us(_now_us())})"
        if self._sqlite:
            path = sqlite_path(self.url)
            assert path is not None
            lease_path = path.with_name(path.name + ".lease")
            fd = os.open(lease_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                current = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
                os.close(fd)
                raise LeaseHeld(self.target, current) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, who.encode(), 0)
            self._lease_fd = fd
            return
        # PostgreSQL: the advisory lock is taken on the writer connection itself, so it
        # lives exactly as long as the session that commits: a killed writer's last
        # commit has finished (or been rolled back) before the lock is free again.
        conn = self._writer
        got = conn.execute(self._try_lock.sql, self._try_lock.params({"key": _PG_LEASE_KEY})).fetchone()
        if not got or not got[0]:
            row = conn.execute(self._lease_holder.sql, self._lease_holder.params({"name": _LEASE_NAME})).fetchone()
            conn.rollback()
            raise LeaseHeld(self.target, row[0] if row else "another process")
        conn.execute(self._lease_upsert.sql, self._lease_upsert.params(
            {"name": _LEASE_NAME, "holder": who, "acquired_us": _now_us()}))
        conn.commit()

    # -- appends ----------------------------------------------------------------

    def append(self, batch: Sequence[NewEvent]) -> list[AppendResult]:
        if not batch:
            return []
        with self._lock:
            if self._closed:
                raise StoreError(f"the log at {self.target} is closed")
            try:
                cur = self._writer.cursor()
                if self._sqlite:
                    cur.execute("BEGIN IMMEDIATE")
                results = self._write(cur, batch)
                self._commit()
                return results
            except Exception as exc:
                self._rollback()
                if isinstance(exc, StoreError):
                    raise
                raise StoreError(f"append to {self.target} failed: {exc}") from exc

    def _write(self, cur: Any, batch: Sequence[NewEvent]) -> list[AppendResult]:
        # a savepoint lets a batch that lost a race be undone and redone event by
        # event inside the same transaction, so only the losers fail
        cur.execute("SAVEPOINT fedlog_batch")
        seqs = self._append_fast(cur, batch)
        if seqs is not None:
            cur.execute("RELEASE SAVEPOINT fedlog_batch")
            return [AppendResult(s) for s in seqs]
        cur.execute("ROLLBACK TO SAVEPOINT fedlog_batch")
        results = self._append_slow(cur, batch)
        cur.execute("RELEASE SAVEPOINT fedlog_batch")
        return results

    def _commit(self) -> None:
        if self._sqlite:
            self._writer.execute("COMMIT")
        else:
            self._writer.commit()

    def _rollback(self) -> None:
        try:
            if self._sqlite:
                if self._writer.in_transaction:
                    self._writer.execute("ROLLBACK")
            else:
                self._writer.rollback()
        except Exception:  # the connection may be gone; the next append reports it
            logger.debug("rollback failed", exc_info=True)

    def _state_params(self, e: NewEvent) -> Any:
        if self._fast_state_params:
            if e.version == 1:
                return (e.machine_id, e.kind, e.chart_version, e.dest, e.version, e.terminal,
                        e.deadline_us, e.job_id, e.round, e.site, e.ts_us, e.ts_us)
            return (e.chart_version, e.dest, e.version, e.terminal, e.deadline_us, e.round,
                    e.ts_us, e.machine_id, e.version - 1)
        stmt = self._ins_state if e.version == 1 else self._upd_state
        return stmt.params(self._state_values(e))

    def _event_params(self, e: NewEvent) -> Any:
        if self._fast_event_params:
            data = None if e.data is None else orjson.dumps(e.data).decode()
            return (e.machine_id, e.kind, e.chart_version, e.version, e.trigger, e.source, e.dest,
                    e.job_id, e.round, e.site, data, e.deadline_us, e.ts_us, e.writer)
        return self._ins_event.params(self._event_values(e))

    def _state_values(self, e: NewEvent) -> dict[str, Any]:
        return {
            "machine_id": e.machine_id, "kind": e.kind, "chart_version": e.chart_version,
            "state": e.dest, "version": e.version, "terminal": e.terminal,
            "deadline_us": e.deadline_us, "job_id": e.job_id, "round": e.round, "site": e.site,
            "created_us": e.ts_us, "updated_us": e.ts_us,
            "b_machine_id": e.machine_id, "b_expected": e.version - 1,
        }

    def _event_values(self, e: NewEvent) -> dict[str, Any]:
        data: Any
        if e.data is None:
            data = None
        elif self._sqlite:
            data = orjson.dumps(e.data).decode()
        else:
            from psycopg.types.json import Json

            data = Json(e.data, dumps=_orjson_dumps)
        return {
            "machine_id": e.machine_id, "kind": e.kind, "chart_version": e.chart_version,
            "version": e.version, "trigger": e.trigger, "source": e.source, "dest": e.dest,
            "job_id": e.job_id, "round": e.round, "site": e.site, "data": data,
            "deadline_us": e.deadline_us, "ts_us": e.ts_us, "writer": e.writer,
        }

    def _append_fast(self, cur: Any, batch: Sequence[NewEvent]) -> list[int] | None:
        new = [self._state_params(e) for e in batch if e.version == 1]
        moved = [self._state_params(e) for e in batch if e.version != 1]
        if new:
            cur.executemany(self._ins_state.sql, new)
            if cur.rowcount != len(new):
                return None
        if moved:
            cur.executemany(self._upd_state.sql, moved)
            if cur.rowcount != len(moved):
                return None
        rows = [self._event_params(e) for e in batch]
        return self._insert_events(cur, rows)

    def _insert_events(self, cur: Any, rows: list[Any]) -> list[int]:
        if self._sqlite:
            cur.executemany(self._ins_event.sql, rows)
            assert self._last_rowid is not None
            last = cur.execute(self._last_rowid.sql).fetchone()[0]
            return list(range(last - len(rows) + 1, last + 1))
        cur.executemany(self._ins_event.sql, rows, returning=True)
        seqs: list[int] = []
        while True:
            seqs.append(cur.fetchone()[0])
            if not cur.nextset():
                break
        return seqs

    def _append_slow(self, cur: Any, batch: Sequence[NewEvent]) -> list[AppendResult]:
        results: list[AppendResult] = []
        lost: set[str] = set()
        for e in batch:
            chained = e.machine_id in lost
            ok = False
            if not chained:
                stmt = self._ins_state if e.version == 1 else self._upd_state
                cur.execute(stmt.sql, self._state_params(e))
                ok = cur.rowcount == 1
            if not ok:
                lost.add(e.machine_id)
                row = cur.execute(self._version_of.sql, self._version_of.params({"machine_id": e.machine_id})).fetchone()
                actual = row[0] if row else 0
                error = chained_conflict(e, actual) if chained else ConcurrencyConflict(e.machine_id, e.version - 1, actual)
                results.append(AppendResult(None, error))
                continue
            (seq,) = self._insert_events(cur, [self._event_params(e)])
            results.append(AppendResult(seq))
        return results

    # -- reads ------------------------------------------------------------------

    def read(
        self,
        *,
        machine_id: str | None = None,
        job_id: str | None = None,
        after_seq: int = 0,
        until_seq: int | None = None,
        until_us: int | None = None,
        limit: int | None = None,
        with_data: bool = True,
    ) -> Iterator[StoredEvent]:
        e = events.c
        cols = [e[name] if (name != "data" or with_data) else literal(None).label("data") for name in _READ_COLUMNS]
        stmt = select(*cols).where(e.seq > after_seq)
        if machine_id is not None:
            stmt = stmt.where(e.machine_id == machine_id)
        if job_id is not None:
            stmt = stmt.where(e.job_id == job_id)
        if until_seq is not None:
            stmt = stmt.where(e.seq <= until_seq)
        if until_us is not None:
            stmt = stmt.where(e.ts_us <= until_us)
        stmt = stmt.order_by(e.seq)
        if limit is not None:
            stmt = stmt.limit(limit)
        compiled = stmt.compile(dialect=self.engine.dialect)
        params: Any = (
            tuple(compiled.params[n] for n in compiled.positiontup) if compiled.positiontup else compiled.params
        )
        raw = self.engine.raw_connection()
        try:
            cur = raw.cursor()
            cur.execute(str(compiled), params)
            decode = self._sqlite and with_data
            while True:
                rows = cur.fetchmany(5000)
                if not rows:
                    break
                for r in rows:
                    data = r[10]
                    if decode and data is not None:
                        data = orjson.loads(data)
                    yield StoredEvent(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9],
                                      data, r[11], r[12], r[13], r[14])
            cur.close()
        finally:
            raw.close()

    def _row(self, r: Any) -> MachineRow:
        return MachineRow(
            machine_id=r.machine_id, kind=r.kind, chart_version=r.chart_version, state=r.state,
            version=r.version, terminal=bool(r.terminal), deadline_us=r.deadline_us,
            job_id=r.job_id, round=r.round, site=r.site, created_us=r.created_us, updated_us=r.updated_us,
        )

    def get_machine(self, machine_id: str) -> MachineRow | None:
        with self.engine.connect() as conn:
            r = conn.execute(select(machine_states).where(machine_states.c.machine_id == machine_id)).first()
        return self._row(r) if r is not None else None

    def machines(
        self, *, kind: str | None = None, live_only: bool = False, job_id: str | None = None
    ) -> list[MachineRow]:
        ms = machine_states.c
        stmt = select(machine_states)
        if kind is not None:
            stmt = stmt.where(ms.kind == kind)
        if live_only:
            stmt = stmt.where(ms.terminal.is_(False))
        if job_id is not None:
            stmt = stmt.where(ms.job_id == job_id)
        with self.engine.connect() as conn:
            return [self._row(r) for r in conn.execute(stmt.order_by(ms.machine_id))]

    def timers(self) -> list[tuple[int, str, int]]:
        ms = machine_states.c
        stmt = (
            select(ms.deadline_us, ms.machine_id, ms.version)
            .where(ms.deadline_us.is_not(None), ms.terminal.is_(False))
            .order_by(ms.deadline_us, ms.machine_id)
        )
        with self.engine.connect() as conn:
            return [(int(d), str(m), int(v)) for d, m, v in conn.execute(stmt)]

    def last_seq(self) -> int:
        with self.engine.connect() as conn:
            value = conn.execute(select(func.max(events.c.seq))).scalar()
        return int(value or 0)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._writer.close()
            finally:
                self._release_lease()
                self.engine.dispose()

    def _release_lease(self) -> None:
        # PostgreSQL's advisory lock belongs to the writer session and goes with it
        if self._lease_fd is not None:
            os.close(self._lease_fd)  # closing the descriptor releases the flock
            self._lease_fd = None


def _sqlite_pragmas(conn: sqlite3.Connection, sync: str) -> None:
    """Set WAL, the sync level and the busy timeout on a new SQLite connection.

    Turning a fresh file into WAL needs an exclusive lock, and SQLite answers
    "database is locked" at once, without waiting out the busy timeout, when that
    would deadlock with another connection's lock upgrade -- which happens when
    several processes open a new log together. That answer is retried for a while.
    """
    cur = conn.cursor()
    try:
        cur.execute("PRAGMA busy_timeout=10000")
        deadline = time.monotonic() + 10
        while True:
            try:
                cur.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.005)
        cur.execute(f"PRAGMA synchronous={sync}")
    finally:
        cur.close()


def _orjson_dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


def _now_us() -> int:
    return time.time_ns() // 1000


def open_recorder(
    target: str | Path | URL,
    *,
    durability: Durability = Durability.FULL,
    auto_upgrade: bool = True,
    lease_holder: str | None = None,
) -> EventRecorder:
    """Open the event log at ``target`` (``memory`` gives a ``MemoryRecorder``)."""
    if str(target) == "memory":
        from engine.log.memory import MemoryRecorder

        return MemoryRecorder()
    return SqlRecorder(target, durability=durability, auto_upgrade=auto_upgrade, lease_holder=lease_holder)
