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


def test_fedlog_processes_set_numpy_defaults_unless_the_user_chose(monkeypatch) -> None:
    """One BLAS thread and no transparent huge pages for numpy, except in a one-site client."""
    from engine.cli import NUMPY_DEFAULTS, numpy_defaults

    for argv, expected in ((["server", "--db", "x.db"], True), (["simulate", "job.json"], True),
                           (["client", "--identity", "a", "--identity", "b"], True),
                           (["client", "--identity=a", "--identity=b"], True),
                           (["client", "--identity", "a"], False)):
        for name in NUMPY_DEFAULTS:
            monkeypatch.delenv(name, raising=False)
        numpy_defaults(argv)
        for name, value in NUMPY_DEFAULTS.items():
            assert os.environ.get(name) == (value if expected else None), (argv, name)
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "4")
    monkeypatch.setenv("NUMPY_MADVISE_HUGEPAGE", "1")
    numpy_defaults(["server"])
    assert os.environ["OPENBLAS_NUM_THREADS"] == "4" and os.environ["NUMPY_MADVISE_HUGEPAGE"] == "1"


def test_a_server_process_gives_numpy_no_huge_pages() -> None:
    """The default reaches numpy in a real ``fedlog`` process (it is read once, at numpy's import)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "NUMPY_MADVISE_HUGEPAGE"}
    code = ("import sys; from engine.cli import numpy_defaults; numpy_defaults(['server']); import numpy; "
            "core = getattr(numpy, '_core', None) or numpy.core; print(core.multiarray._get_madvise_hugepage())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
