"""The writer lease, held and contested by real processes.

A holder process opens the log with ``lease_holder=`` and keeps it until told to
close (or until it is SIGKILLed). Contenders are separate processes started with
``sys.executable -c``; they must be refused with ``LeaseHeld`` naming the holder,
and must get the lease once the holder is gone -- closed or killed: the kernel
drops a dead process's flock, PostgreSQL its session's advisory lock.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from engine.errors import LeaseHeld
from engine.log.sql import SqlRecorder
from engine.log.target import is_sqlite, to_url

HOLD = """
import sys
from engine.log.sql import open_recorder
rec = open_recorder(sys.argv[1], lease_holder=sys.argv[2])
print("ready", flush=True)
sys.stdin.read()  # hold the lease until the test closes our stdin
rec.close()
print("closed", flush=True)
"""

CONTEND = """
import json, sys
from engine.errors import LeaseHeld
from engine.log.sql import open_recorder
try:
    rec = open_recorder(sys.argv[1], lease_holder=sys.argv[2])
except LeaseHeld as exc:
    print(json.dumps({"refused": True, "holder": exc.holder, "message": str(exc)}), flush=True)
    sys.exit(3)
rec.close()
print(json.dumps({"refused": False}), flush=True)
"""


class Holder:
    """A child process holding the writer lease of one log."""

    def __init__(self, url: str, name: str) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLD, url, name],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        self._buf = b""

    def line(self, timeout: float = 60.0) -> str:
        """The next line the child prints; fail (with its stderr) if it exits or stalls."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"holder {self.name} printed nothing for {timeout}s")
            ready, _, _ = select.select([self.proc.stdout], [], [], remaining)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:
                    pytest.fail(f"holder {self.name} exited: {self.stop()}")
                self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode()

    def close(self) -> None:
        """Ask the holder to close its recorder and wait until it has exited cleanly."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        assert self.line() == "closed"
        assert self.proc.wait(timeout=60) == 0

    def kill(self) -> None:
        """SIGKILL the holder: no cleanup code of ours runs in it."""
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(timeout=60) == -signal.SIGKILL

    def stop(self) -> str:
        """Make sure the child is gone and its pipes are closed; return its stderr."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=60)
        err = self.proc.stderr.read().decode() if self.proc.stderr and not self.proc.stderr.closed else ""
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None and not pipe.closed:
                pipe.close()
        return err


@pytest.fixture
def holders() -> Iterator[list[Holder]]:
    started: list[Holder] = []
    yield started
    for h in started:
        h.stop()


def hold(holders: list[Holder], url: str, name: str) -> Holder:
    holder = Holder(url, name)
    holders.append(holder)
    assert holder.line() == "ready"
    return holder


def contend(url: str, name: str) -> dict[str, object]:
    """Try to take the lease from another process; return what it saw."""
    done = subprocess.run(
        [sys.executable, "-c", CONTEND, url, name], capture_output=True, text=True, timeout=120,
    )
    assert done.returncode in (0, 3), done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    assert result["refused"] == (done.returncode == 3)
    return result


def wait_until_released(url: str) -> None:
    """After a SIGKILL, wait (with a deadline) until the database has dropped the dead lock.

    The kernel releases a flock when the process dies, before ``wait`` returns. A
    PostgreSQL backend notices its client is gone on its next socket read, which is
    soon but not synchronous with our ``wait``; we wait for the advisory lock to
    disappear from ``pg_locks`` -- the condition itself, not a guess at its timing.
    """
    if is_sqlite(to_url(url)):
        return
    import psycopg

    deadline = time.monotonic() + 30
    with psycopg.connect(url, autocommit=True) as conn:
        while True:
            (count,) = conn.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND database = "
                "(SELECT oid FROM pg_database WHERE datname = current_database())"
            ).fetchone()  # type: ignore[misc]
            if count == 0:
                return
            if time.monotonic() > deadline:
                pytest.fail("PostgreSQL kept the dead holder's advisory lock for 30 s")
            time.sleep(0.02)


def assert_refused_by(result: dict[str, object], holder: Holder) -> None:
    assert result["refused"] is True
    message = str(result["message"])
    assert holder.name in str(result["holder"])
    assert holder.name in message and f"pid {holder.proc.pid}" in message
    assert "refusing to start" in message


@pytest.fixture
def log_url(sql_url: str) -> str:
    SqlRecorder(sql_url).close()  # schema first: holders and contenders then only open it
    return sql_url


def test_second_process_is_refused_while_the_first_holds(holders: list[Holder], log_url: str) -> None:
    first = hold(holders, log_url, "server-one")
    assert_refused_by(contend(log_url, "server-two"), first)
    assert_refused_by(contend(log_url, "server-three"), first)  # refusing leaves it held
    with pytest.raises(LeaseHeld) as info:  # a second recorder in this process too
        SqlRecorder(log_url, lease_holder="in-process")
    assert "server-one" in info.value.holder
    first.close()
    assert contend(log_url, "server-two") == {"refused": False}


def test_readers_need_no_lease(holders: list[Holder], log_url: str) -> None:
    hold(holders, log_url, "server-one")
    reader = SqlRecorder(log_url)
    try:
        assert reader.last_seq() == 0
    finally:
        reader.close()


def test_lease_of_a_sigkilled_holder_can_be_taken(holders: list[Holder], log_url: str) -> None:
    first = hold(holders, log_url, "server-one")
    assert_refused_by(contend(log_url, "server-two"), first)
    first.kill()
    wait_until_released(log_url)
    second = hold(holders, log_url, "server-two")
    # the dead holder's name is gone: a contender is told who holds it now
    result = contend(log_url, "server-three")
    assert_refused_by(result, second)
    assert "server-one" not in str(result["message"])
    second.kill()
    wait_until_released(log_url)
    assert contend(log_url, "server-three") == {"refused": False}


def test_lease_is_released_by_close_in_process(log_url: str) -> None:
    first = SqlRecorder(log_url, lease_holder="one")
    with pytest.raises(LeaseHeld):
        SqlRecorder(log_url, lease_holder="two")
    first.close()
    second = SqlRecorder(log_url, lease_holder="two")
    second.close()
