"""Start-up imports run with the cyclic collector off, and what they made is frozen afterwards."""

from __future__ import annotations

import gc
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
