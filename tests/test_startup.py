"""Process start-up: imports run with the cyclic collector off (what they made is frozen afterwards);
numpy and malloc defaults of fedlog's own processes."""

from __future__ import annotations

import gc
import os
import sys
import threading

import pytest

from engine.malloc import MALLOC_SETTINGS, USER_SETTINGS, tune_malloc
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


_FAULTS = """
import os, resource, sys, threading
os.environ["NUMPY_MADVISE_HUGEPAGE"] = "0"
from engine.malloc import tune_malloc
set_ = tune_malloc() if sys.argv[1] == "tuned" else {}
import numpy as np
def steps():  # what a training step does to memory: big blocks made and let go, again and again
    for _ in range(20):
        a = np.ones(4 << 20, np.float32)
        b = np.ones(4 << 20, np.float32)
        del a, b
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
threads = [threading.Thread(target=steps) for _ in range(2)]
for t in threads: t.start()
for t in threads: t.join()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, sorted(set_))
"""


@pytest.mark.skipif(sys.platform != "linux" or not hasattr(__import__("ctypes").CDLL(None), "mallopt"),
                    reason="glibc's mallopt")
def test_a_site_process_reuses_freed_memory_instead_of_faulting_it_in_again() -> None:
    """With the settings each thread's two 16 MiB blocks are faulted in once (4 x 4096 pages)
    and reused; with glibc's defaults the pages of freed blocks come back as fresh faults."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in USER_SETTINGS}
    runs = {mode: subprocess.run([sys.executable, "-c", _FAULTS, mode], env=env, capture_output=True, text=True,
                                 check=True).stdout.split(maxsplit=1) for mode in ("default", "tuned")}
    first_touch = 2 * 2 * (16 << 20) // 4096
    assert runs["tuned"][1].strip() == str(sorted(name for name, _, _ in MALLOC_SETTINGS))
    assert int(runs["tuned"][0]) < first_touch * 1.1 < int(runs["default"][0]), runs


def test_only_site_processes_tune_malloc_and_the_user_setting_wins(monkeypatch) -> None:
    import engine.cli

    calls = []
    monkeypatch.setattr(engine.cli, "tune_malloc", lambda: calls.append(1))
    monkeypatch.setattr(engine.cli, "numpy_defaults", lambda argv: None)  # not this test's process
    for command, expected in (("client", 1), ("server", 0), ("simulate", 0)):
        calls.clear()
        monkeypatch.setattr(sys, "argv", ["fedlog", command, "--help"])
        with pytest.raises(SystemExit):
            engine.cli.main()
        assert len(calls) == expected, command
    monkeypatch.setenv("MALLOC_TOP_PAD_", "0")
    assert tune_malloc() == {}
