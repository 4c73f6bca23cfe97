"""Import-heavy start-up without the cyclic garbage collector walking the heap over and over.

Importing a large stack makes hundreds of thousands of objects, and the collector runs
every few hundred allocations, each time walking more of them: importing torch took
1.35 s of CPU here with the collector on and 1.0 s with it off. The objects a module
import makes live as long as the process, so once the imports are done they are moved
to the permanent generation (``gc.freeze``), where later collections never walk them.
That is what ``importing()`` does; nested and concurrent uses (the site process
imports its executor's stack on a thread while its agents start) keep the collector
off until the last one ends.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["importing"]

_lock = threading.Lock()
_active = 0
_was_enabled = True


@contextmanager
def importing() -> Iterator[None]:
    """Run the block (imports) with the cyclic collector off; then freeze what exists and turn it back on."""
    global _active, _was_enabled
    with _lock:
        if _active == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _active += 1
    try:
        yield
    finally:
        with _lock:
            _active -= 1
            if _active == 0:
                gc.freeze()
                if _was_enabled:
                    gc.enable()
