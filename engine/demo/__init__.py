"""The recovery demo: a seeded plan of job machines, a resumable driver, a crash harness.

* ``plan``: which trigger each machine gets at which logical tick (deterministic);
* ``driver``: runs a plan against a log from wherever it stopped (``python -m engine.demo``);
* ``harness``: runs the driver as a child process, SIGKILLs it when the log passes
  chosen points, restarts it, and compares the outcome with an uncrashed run;
* ``report``: ``run_demo``, the above for people, with progress and a verdict.

``fedlog demo`` (``engine/commands/demo.py``) is a thin shell over ``run_demo``; the
crash tests in ``tests/machines`` use the same pieces.
"""

from __future__ import annotations
