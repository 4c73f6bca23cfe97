"""Every error the engine raises on purpose.

One tree, so callers can catch as broadly or as narrowly as they need, and each
exception carries the data a program needs to react (not only a message)::

    EngineError
    ├── ConfigError                 bad settings, bad database URL, unusable path
    ├── ChartError                  a statechart file is malformed or inconsistent
    │   └── ChartValidationError    .problems: list[ChartProblem] (file, line, message)
    ├── StoreError                  the event log could not do what was asked
    │   ├── ConcurrencyConflict     .machine_id, .expected, .actual, .reason  (lost an append race)
    │   ├── LeaseHeld               .holder  (another writer drives this log)
    │   └── SchemaError             the database schema is older/newer than the code
    ├── TransitionRejected          .machine_id, .state, .trigger, .legal
    │   └── GuardRejected           .guard  (trigger legal, its guard said no)
    ├── InvalidEventData            .machine_id, .trigger, .path  (data the log cannot hold exactly)
    ├── UnknownMachine              .machine_id
    ├── LogCorrupted                .problems: list[str]  (replay --verify found a lie)
    ├── NondeterminismError         .call, .recorded  (replay diverged from the log)
    ├── TaskError                   .argument  (a task or scheduling argument cannot be used)
    ├── ManifestError               .path  (a tensor manifest is malformed or lies about its tensors)
    ├── ChunkError                  the chunk store could not do what was asked
    │   ├── ChunkIntegrityError     .digest  (bytes that do not hash to their address; never used)
    │   └── ChunkMissing            .digest  (the store does not hold the chunk)
    ├── HttpError                   .status, .code, .message, .details  (server: answer with an error)
    ├── ClientDisconnected          (server: the peer left while its body was read)
    ├── TransportError              .method, .url, .reason, .maybe_processed  (client: no HTTP answer)
    └── RemoteError                 .status, .code, .message, .details  (client: the server said no)
        └── AuthError               401 (who are you?) or 403 (not allowed)

Domain conditions never surface as ``ValueError`` or ``AssertionError``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "AuthError",
    "ChartError",
    "ClientDisconnected",
    "ChartProblem",
    "ChartValidationError",
    "ChunkError",
    "ChunkIntegrityError",
    "ChunkMissing",
    "ConcurrencyConflict",
    "ConfigError",
    "EngineError",
    "GuardRejected",
    "InvalidEventData",
    "HttpError",
    "LeaseHeld",
    "LogCorrupted",
    "ManifestError",
    "NondeterminismError",
    "RemoteError",
    "SchemaError",
    "StoreError",
    "TaskError",
    "TransitionRejected",
    "TransportError",
    "UnknownMachine",
]


class EngineError(Exception):
    """Root of every error fedlog raises deliberately."""


class ConfigError(EngineError):
    """Settings or a command-line value cannot be used (bad URL, bad path, bad number)."""


class ChartError(EngineError):
    """A statechart cannot be loaded."""


@dataclass(frozen=True, slots=True)
class ChartProblem:
    """One thing wrong with a statechart file, located as precisely as we can."""

    file: str
    line: int | None
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: {self.message}"


class ChartValidationError(ChartError):
    """A statechart failed validation; ``problems`` lists every finding, not just the first."""

    def __init__(self, problems: Sequence[ChartProblem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class StoreError(EngineError):
    """The event log (or its database) refused or failed an operation."""


class ConcurrencyConflict(StoreError):
    """An append lost a race: the machine is not at the version the writer expected.

    Nothing was written. ``actual`` is the version found in the log (0 if the machine
    does not exist there). ``reason``, when given, says why the append was refused
    when the version numbers alone would mislead (e.g. an earlier event of the same
    machine in the same batch was rejected, so this one, planned on top of it, was too).
    """

    def __init__(self, machine_id: str, expected: int, actual: int, reason: str | None = None) -> None:
        self.machine_id = machine_id
        self.expected = expected
        self.actual = actual
        self.reason = reason
        why = reason or f"expected to append after version {expected}, but the log holds version {actual}"
        super().__init__(f"machine {machine_id!r}: {why}; nothing was written")


class LeaseHeld(StoreError):
    """Another process holds the writer lease on this log; we refuse to drive it too."""

    def __init__(self, target: str, holder: str) -> None:
        self.target = target
        self.holder = holder
        super().__init__(f"the log at {target} is already driven by {holder}; refusing to start")


class SchemaError(StoreError):
    """The database schema does not match the code (older: upgrade it; newer: upgrade fedlog)."""


class TransitionRejected(EngineError):
    """A trigger is not legal in the machine's current state; nothing was written."""

    def __init__(
        self, machine_id: str, kind: str, state: str, trigger: str, legal: Sequence[str]
    ) -> None:
        self.machine_id = machine_id
        self.kind = kind
        self.state = state
        self.trigger = trigger
        self.legal = sorted(legal)
        legal_text = ", ".join(self.legal) if self.legal else "none (terminal state)"
        super().__init__(
            f"{kind} machine {machine_id!r} is in state {state!r}: trigger {trigger!r} "
            f"is not legal there; legal triggers: {legal_text}"
        )


class GuardRejected(TransitionRejected):
    """The trigger is legal in this state but its guard returned false; nothing was written."""

    def __init__(
        self, machine_id: str, kind: str, state: str, trigger: str, guard: str, legal: Sequence[str]
    ) -> None:
        super().__init__(machine_id, kind, state, trigger, legal)
        self.guard = guard
        self.args = (
            f"{kind} machine {machine_id!r} in state {state!r}: guard {guard!r} "
            f"refused trigger {trigger!r}; nothing was written",
        )


class UnknownMachine(EngineError):
    """No machine with this id exists in the log."""

    def __init__(self, machine_id: str) -> None:
        self.machine_id = machine_id
        super().__init__(f"no machine {machine_id!r} in the log")


class LogCorrupted(EngineError):
    """Replay found events that the charts forbid, or a projection that disagrees with them."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        head = "\n".join(self.problems[:20])
        more = f"\n... and {len(self.problems) - 20} more" if len(self.problems) > 20 else ""
        super().__init__(f"{len(self.problems)} problem(s) in the log:\n{head}{more}")


class NondeterminismError(EngineError):
    """A replayed controller asked for something other than what the log recorded."""

    def __init__(self, call: str, recorded: str) -> None:
        self.call = call
        self.recorded = recorded
        super().__init__(f"replay diverged: the controller called {call}, the log recorded {recorded}")


class HttpError(EngineError):
    """An error answer: status, stable code, message for people, extra JSON fields, headers."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: Mapping[str, str] | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})
        self.details = dict(details or {})
        super().__init__(f"{status} {code}: {message}")

    def body(self) -> dict[str, Any]:
        """The JSON document sent for this error."""
        return {"error": {"code": self.code, "message": self.message, **self.details}}


class ClientDisconnected(EngineError):
    """The peer went away while its request body was being read (there is no one to answer)."""


class TransportError(EngineError):
    """No HTTP response: the connection failed, broke or timed out."""

    def __init__(self, method: str, url: str, reason: str, *, maybe_processed: bool = False) -> None:
        self.method = method
        self.url = url
        self.reason = reason
        self.maybe_processed = maybe_processed
        tail = "; the server may have processed it" if maybe_processed else ""
        super().__init__(f"{method} {url}: {reason}{tail}")


class RemoteError(EngineError):
    """The server answered with an error status and (usually) a JSON error body."""

    def __init__(
        self,
        method: str,
        url: str,
        status: int,
        code: str,
        message: str,
        *,
        details: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.method = method
        self.url = url
        self.status = status
        self.code = code
        self.message = message
        self.details: dict[str, Any] = dict(details or {})
        self.headers: dict[str, str] = dict(headers or {})
        super().__init__(f"{method} {url}: {status} {code}: {message}")


class AuthError(RemoteError):
    """The server refused the credential (401) or the identity's access to the route (403)."""


class TaskError(EngineError):
    """A scheduling argument, task field or submitted value cannot be used; nothing was written.

    ``argument`` names the offending argument (``"targets"``, ``"min_responses"``,
    ``"task.data"``, ``"result"``...).
    """

    def __init__(self, argument: str, message: str) -> None:
        self.argument = argument
        super().__init__(f"{argument}: {message}")


class InvalidEventData(EngineError):
    """An event's data holds a value the log cannot store exactly; nothing was written.

    ``path`` locates the value (``data.metrics.loss``, ``data.items[3]``).
    """

    def __init__(self, machine_id: str, trigger: str, path: str, what: str) -> None:
        self.machine_id = machine_id
        self.trigger = trigger
        self.path = path
        super().__init__(
            f"machine {machine_id!r}, trigger {trigger!r}: {path} is {what}; "
            "event data must be JSON with finite numbers; nothing was written"
        )


class ManifestError(EngineError):
    """A tensor manifest is malformed, or lies about its tensors (sizes, dtypes, chunk counts).

    ``path`` names the offending entry (``tensors[3].shape``, ``chunks[2]`` ...).
    """

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"manifest {path}: {message}")
        self.path = path


class ChunkError(EngineError):
    """The chunk store could not do what was asked."""


class ChunkIntegrityError(ChunkError):
    """Bytes that do not hash to the address they were stored or sent under; they are never used."""

    def __init__(self, digest: str, message: str) -> None:
        super().__init__(f"chunk {digest}: {message}")
        self.digest = digest


class ChunkMissing(ChunkError):
    """The store does not hold this chunk."""

    def __init__(self, digest: str, where: str = "the chunk store") -> None:
        super().__init__(f"chunk {digest} is not in {where}")
        self.digest = digest
