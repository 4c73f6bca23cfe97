"""Start-up imports run with the cyclic collector off, and what they made is frozen afterwards."""

from __future__ import annotations

import gc
import os
import threading

from engine.startup import importing


def test_the_collector_stays_off_until_the_last_import_block_ends_then_is_back_with_the_heap_frozen() -> None:
    assert gc.isenabled()
    gc.unfreeze()
    inside = threading.Event()
    leave = threading.Event()

    def other() -> None:
        with importing():
            inside.set()
            leave.wait(10)

    thread = threading.Thread(target=other)
    with importing():
        assert not gc.isenabled()
        thread.start()
        assert inside.wait(10)
    assert not gc.isenabled()  # the other thread's block is still open
    leave.set()
    thread.join(10)
    assert gc.isenabled() and gc.get_freeze_count() > 0
    gc.unfreeze()


def test_a_collector_that_was_off_stays_off() -> None:
    gc.disable()
    try:
        with importing():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
        gc.unfreeze()


def test_fedlog_processes_give_numpy_one_blas_thread_unless_the_user_chose(monkeypatch) -> None:
    from engine.cli import one_blas_thread

    for argv, expected in ((["server", "--db", "x.db"], "1"), (["simulate", "job.json"], "1"),
                           (["client", "--identity", "a", "--identity", "b"], "1"),
                           (["client", "--identity=a", "--identity=b"], "1"),
                           (["client", "--identity", "a"], None)):
        monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
        one_blas_thread(argv)
        assert os.environ.get("OPENBLAS_NUM_THREADS") == expected, argv
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "4")
    one_blas_thread(["server"])
    assert os.environ["OPENBLAS_NUM_THREADS"] == "4"
