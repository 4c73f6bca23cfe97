"""Statecharts as plain frozen data: what a YAML file declares, after validation.

A ``Chart`` round-trips to a plain dict (``to_dict``) and is the one description of
a machine kind: the runtime's hot path uses its transition table directly, and the
``transitions`` library machines (for checking and drawing) are built from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Chart", "ChartState", "ChartTransition", "StateTimeout"]

DEFAULT_TIMEOUT_TRIGGER = "timeout"


@dataclass(frozen=True, slots=True)
class StateTimeout:
    """When a state's timer fires: a fixed delay, or one taken from the entering event's data.

    ``seconds`` is used when ``from_data`` is unset or the key is absent; if the event
    data names ``from_data`` with a null or non-positive value, no timer is armed.
    """

    seconds: float | None = None
    from_data: str | None = None
    trigger: str = DEFAULT_TIMEOUT_TRIGGER

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"trigger": self.trigger}
        if self.seconds is not None:
            out["after"] = self.seconds
        if self.from_data is not None:
            out["from_data"] = self.from_data
        return out


@dataclass(frozen=True, slots=True)
class ChartState:
    """One state: terminal or not, optionally with a timeout."""

    name: str
    terminal: bool = False
    timeout: StateTimeout | None = None
    description: str = ""
    line: int | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.terminal:
            out["terminal"] = True
        if self.timeout is not None:
            out["timeout"] = self.timeout.to_dict()
        if self.description:
            out["description"] = self.description
        return out


@dataclass(frozen=True, slots=True)
class ChartTransition:
    """One edge: ``trigger`` moves ``source`` to ``dest`` if ``guard`` (a named predicate) holds."""

    trigger: str
    source: str
    dest: str
    guard: str | None = None
    line: int | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"trigger": self.trigger, "source": self.source, "dest": self.dest}
        if self.guard:
            out["guard"] = self.guard
        return out


@dataclass(frozen=True)
class Chart:
    """A validated statechart of one machine kind at one version."""

    name: str
    version: int
    initial: str
    states: Mapping[str, ChartState]
    transitions: tuple[ChartTransition, ...]
    description: str = ""
    file: str = field(default="<memory>", compare=False)
    #: (source, trigger) -> transition: the runtime's lookup
    table: Mapping[tuple[str, str], ChartTransition] = field(init=False, repr=False)
    #: state -> sorted legal triggers
    legal: Mapping[str, tuple[str, ...]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        table = {(t.source, t.trigger): t for t in self.transitions}
        legal: dict[str, list[str]] = {s: [] for s in self.states}
        for t in self.transitions:
            legal.setdefault(t.source, []).append(t.trigger)
        object.__setattr__(self, "table", table)
        object.__setattr__(self, "legal", {s: tuple(sorted(set(v))) for s, v in legal.items()})

    def is_terminal(self, state: str) -> bool:
        """True when ``state`` is terminal (unknown states are not)."""
        spec = self.states.get(state)
        return spec is not None and spec.terminal

    def to_dict(self) -> dict[str, Any]:
        """The chart as plain data, in the YAML file's shape."""
        out: dict[str, Any] = {
            "name": self.name,
            "version": self.version,
            "initial": self.initial,
            "states": {name: s.to_dict() for name, s in self.states.items()},
            "transitions": [t.to_dict() for t in self.transitions],
        }
        if self.description:
            out["description"] = self.description
        return out
