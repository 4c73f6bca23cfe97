"""What a site runs: the executor contract and how ``module:function`` references resolve.

An executor is a plain function of one ``SiteTask`` that returns the task's result
(JSON: dicts, lists, str, finite numbers, bool, None)::

    def train(task: SiteTask) -> dict:
        model = task.data["model"]
        ...
        return {"model": new_model, "n": examples}

It is named in the job as ``package.module:function`` and imported by each site, so
the code runs where it was installed, never shipped over the network. (A simulation
started by the same user may ship a locally defined function with cloudpickle to the
processes it started; see ``engine.sim``.) The function is called once per
assignment; after a crash of either side the site re-submits the result it already
computed (kept in its local log) instead of calling it again.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from engine.errors import ConfigError

if TYPE_CHECKING:
    from engine.client.engine import SiteEngine

__all__ = ["Executor", "SiteTask", "load_callable"]


@dataclass(frozen=True)
class SiteTask:
    """One assignment as the executor sees it."""

    job_id: str
    task_id: str
    #: the idempotency key of the result (one per task and site)
    client_task_id: str
    #: the task's name ("train", "stats", ...): one executor may serve several
    name: str
    data: Any
    props: dict[str, Any]
    #: this site's name
    site: str
    #: the sites of the job (sorted), as the server knew them when it handed this out
    job_sites: tuple[str, ...] = ()
    #: how many times the server has handed this assignment out (1 the first time)
    send_count: int = 0
    #: relay hop / sequential slot (None for a broadcast)
    hop: int | None = None
    #: the site's engine API (aux messages, job clients); None when run outside an agent
    engine: SiteEngine | None = field(default=None, compare=False, repr=False)


#: an executor: a function of the assignment returning the JSON result
Executor = Callable[[SiteTask], Any]


def load_callable(ref: str, what: str = "executor") -> Callable[..., Any]:
    """Import ``package.module:function`` (dots allowed after the colon); ConfigError if it cannot be used."""
    if not isinstance(ref, str):
        raise ConfigError(f"{what} must be 'package.module:function', got {ref!r}")
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{what} {ref!r} must look like 'package.module:function'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{what} {ref!r}: cannot import {module_name!r}: {exc}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"{what} {ref!r}: {module_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise ConfigError(f"{what} {ref!r} is not callable ({type(obj).__name__})")
    return obj  # type: ignore[no-any-return]
