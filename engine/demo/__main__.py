"""``python -m engine.demo``: the demo's driver process (``fedlog demo`` starts it)."""

from __future__ import annotations

import sys

from engine.demo.driver import main

if __name__ == "__main__":
    sys.exit(main())
