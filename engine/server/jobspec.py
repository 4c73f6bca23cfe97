"""What a job is: a workflow, an executor and their configuration, checked before anything is stored.

A job spec is JSON::

    {"workflow": "fedavg" | "package.module:function",
     "args": {...},                       # keyword arguments of the workflow (JSON)
     "executor": "package.module:function",  # what each site runs (imported on the site)
     "name": "my job",                    # optional, default: the workflow's name
     "min_sites": 1,                      # sites that must be active before the job starts
     "required_sites": ["site-1"],        # the job fails if one of these is declared dead
     "deploy_timeout": 300}               # seconds to wait for min_sites (then FAILED)

The workflow is resolved on the server when the job is submitted (a name that does not
import is refused then, not when the job starts); the executor is resolved on each
site. Bad specs raise ``JobSpecError`` naming the field; nothing is stored.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from engine.client.executor import load_callable
from engine.errors import ConfigError, EngineError
from engine.provision import check_name
from engine.server.tensor_streamer import TensorStreamConfig, TensorStreamConfigError

__all__ = ["BUILTIN_WORKFLOWS", "JobSpec", "JobSpecError", "resolve_workflow", "result_hash"]

#: workflows known by name; anything else is ``package.module:function``
BUILTIN_WORKFLOWS = {
    "fedavg": "engine.workflows.builtin:fedavg",
    "scatter_and_gather": "engine.workflows.builtin:scatter_and_gather",
    "cyclic": "engine.workflows.builtin:cyclic",
    "fedstats": "engine.jobs.fedstats:fedstats",
    "fedavg_torch": "engine.workflows.builtin:fedavg_torch",
    "swarm": "engine.workflows.swarm:swarm",
}

_FIELDS = ("name", "workflow", "args", "executor", "min_sites", "required_sites", "deploy_timeout", "tensor_stream")


class JobSpecError(EngineError):
    """A job spec that cannot run; ``field`` names the offending entry."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"job spec: {field}: {message}")
        self.field = field


def resolve_workflow(ref: str) -> Callable[..., Any]:
    """The workflow function a spec names (a built-in name or ``package.module:function``)."""
    try:
        return load_callable(BUILTIN_WORKFLOWS.get(ref, ref), "workflow")
    except ConfigError as exc:
        known = ", ".join(sorted(BUILTIN_WORKFLOWS))
        raise JobSpecError("workflow", f"{exc} (built-in workflows: {known})") from None


def result_hash(result: Any) -> str:
    """A content hash of a JSON result: equal for equal results, whatever their key order."""
    canonical = orjson.dumps(result, option=orjson.OPT_SORT_KEYS)
    return "sha256:" + hashlib.sha256(canonical).hexdigest()


@dataclass(frozen=True)
class JobSpec:
    """A checked job spec."""

    workflow: str
    executor: str
    args: dict[str, Any]
    name: str
    min_sites: int = 1
    required_sites: tuple[str, ...] = ()
    deploy_timeout: float = 300.0
    #: the TensorServerStreamer role's settings (``engine.server.tensor_streamer``); None: its defaults
    tensor_stream: dict[str, Any] | None = None

    @classmethod
    def parse(cls, raw: Any, *, known_sites: list[str] | None = None) -> JobSpec:
        """Check ``raw`` (the submitted JSON); ``known_sites``: the provisioned sites, if known."""
        if not isinstance(raw, Mapping):
            raise JobSpecError("spec", f"must be a JSON object, got {type(raw).__name__}")
        unknown = sorted(set(raw) - set(_FIELDS))
        if unknown:
            raise JobSpecError(unknown[0], f"unknown field (known: {', '.join(_FIELDS)})")
        workflow = raw.get("workflow")
        if not isinstance(workflow, str) or not workflow:
            raise JobSpecError("workflow", f"must name a workflow, got {workflow!r}")
        resolve_workflow(workflow)
        executor = raw.get("executor")
        if not isinstance(executor, str) or ":" not in executor:
            raise JobSpecError("executor", f"must be 'package.module:function', got {executor!r}")
        args = raw.get("args", {})
        if not isinstance(args, dict):
            raise JobSpecError("args", f"must be a JSON object of workflow arguments, got {type(args).__name__}")
        try:
            args = orjson.loads(orjson.dumps(args))
        except TypeError as exc:
            raise JobSpecError("args", f"must be JSON: {exc}") from None
        name = raw.get("name", workflow)
        if not isinstance(name, str) or not name or len(name) > 200:
            raise JobSpecError("name", f"must be a non-empty string of at most 200 characters, got {name!r}")
        min_sites = raw.get("min_sites", 1)
        if isinstance(min_sites, bool) or not isinstance(min_sites, int) or min_sites < 1:
            raise JobSpecError("min_sites", f"must be an integer >= 1, got {min_sites!r}")
        required = raw.get("required_sites", [])
        if not isinstance(required, list):
            raise JobSpecError("required_sites", f"must be a list of site names, got {required!r}")
        for site in required:
            try:
                check_name(site)
            except ConfigError as exc:
                raise JobSpecError("required_sites", str(exc)) from None
            if known_sites is not None and site not in known_sites:
                raise JobSpecError("required_sites", f"{site!r} is not a provisioned site")
        if known_sites is not None and min_sites > len(known_sites):
            raise JobSpecError("min_sites", f"{min_sites} sites required but only {len(known_sites)} are provisioned")
        timeout = raw.get("deploy_timeout", 300.0)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not math.isfinite(timeout) \
                or timeout <= 0:
            raise JobSpecError("deploy_timeout", f"must be a number of seconds > 0, got {timeout!r}")
        tensor_stream = raw.get("tensor_stream")
        if tensor_stream is not None:
            try:
                tensor_stream = TensorStreamConfig.parse(tensor_stream).as_json()
            except TensorStreamConfigError as exc:
                raise JobSpecError("tensor_stream", str(exc)) from None
        return cls(workflow, executor, args, name, min_sites, tuple(sorted(set(required))), float(timeout),
                   tensor_stream)

    def as_json(self) -> dict[str, Any]:
        """The spec as stored in the job's ``submitted`` event."""
        return {"name": self.name, "workflow": self.workflow, "args": self.args, "executor": self.executor,
                "min_sites": self.min_sites, "required_sites": list(self.required_sites),
                "deploy_timeout": self.deploy_timeout,
                **({"tensor_stream": self.tensor_stream} if self.tensor_stream is not None else {})}
