"""``python -m engine`` is the ``fedlog`` command."""

import sys

from engine.cli import main

sys.exit(main())
