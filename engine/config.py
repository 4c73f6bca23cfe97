"""Settings: a frozen value built once at the edge (CLI, server start) and passed down.

Nothing in the engine reads environment variables or module globals for its
configuration; ``Settings.from_env()`` is the one place that does.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import StrEnum

from engine.errors import ConfigError

__all__ = ["DEFAULT_DB", "Durability", "Settings"]

DEFAULT_DB = "fedlog.db"


class Durability(StrEnum):
    """How hard a commit works to survive power loss.

    ``full``: every acknowledged transition survives an OS crash (SQLite
    ``synchronous=FULL``, PostgreSQL ``synchronous_commit=on``). ``normal``: survives a
    process crash, may lose the last commits on power loss. ``off``: tests and
    throwaway simulations only.
    """

    FULL = "full"
    NORMAL = "normal"
    OFF = "off"

    @classmethod
    def parse(cls, text: str) -> Durability:
        try:
            return cls(text.lower())
        except ValueError:
            raise ConfigError(
                f"unknown durability {text!r}; choose one of: {', '.join(d.value for d in cls)}"
            ) from None


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a process needs to open its log and drive machines."""

    db: str = DEFAULT_DB
    durability: Durability = Durability.FULL
    auto_upgrade: bool = True

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Build settings from ``FEDLOG_*`` variables, then apply explicit overrides."""
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        if "FEDLOG_DB" in env:
            values["db"] = env["FEDLOG_DB"]
        if "FEDLOG_DURABILITY" in env:
            values["durability"] = Durability.parse(env["FEDLOG_DURABILITY"])
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)  # type: ignore[arg-type]
        if isinstance(settings.durability, str) and not isinstance(settings.durability, Durability):
            settings = replace(settings, durability=Durability.parse(settings.durability))
        return settings
