"""Where the shipped data directories (statecharts, migrations) live.

In a wheel they sit inside the package (``engine/_data/...``); in a source checkout
or an editable install they are the top-level ``statecharts/`` and ``migrations/``.
"""

from __future__ import annotations

from pathlib import Path

from engine.errors import ConfigError

__all__ = ["data_dir"]

_PACKAGE = Path(__file__).resolve().parent


def data_dir(name: str) -> Path:
    """Return the directory holding the shipped ``name`` data (``statecharts`` or ``migrations``)."""
    for candidate in (_PACKAGE / "_data" / name, _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise ConfigError(f"the {name!r} directory is missing from this installation of fedlog")
