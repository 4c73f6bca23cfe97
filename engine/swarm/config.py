"""The swarm's configuration: the reference's ``SwarmClientController`` parameters, checked once.

The server's ``swarm`` workflow hands every site the same configuration with its
``swarm_run`` assignment; ``SwarmConfig.from_json`` checks it before anything is
recorded and raises ``ConfigError`` naming the offending parameter.

Parameters keep the reference's names. The reference's component ids map to:

- ``persistor_id`` → the workflow's ``model`` (a ``module:function`` making the
  initial state_dict); each site keeps the best and last models in its chunk store;
- ``shareable_generator_id`` → nothing: payloads are state_dicts as chunks;
- ``aggregator_id`` → ``aggregator``: ``"weighted_mean"`` (by example count, in
  site order, so the result is reproducible) or ``module:function(updates)`` taking
  ``{site: (state_dict, n)}`` and returning a state_dict;
- ``metric_comparator_id`` → ``metric_comparator``: ``"greater"`` (a higher metric
  is better, the default), ``"less"``, or ``module:function(a, b) -> int``.

Additions of fedlog: ``aggregator_timeout`` (seconds a trainer tries a silent
aggregator before another of ``aggr_clients`` takes the round over; the reference
never replaces one) and ``grant_timeout`` (a permission to submit not used within
it frees its slot, so a trainer that died holding one does not block the others).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from engine.errors import ConfigError

__all__ = ["STATUS_TOPIC", "SwarmConfig"]

#: the server-side aux topic the sites report their rounds' states on
STATUS_TOPIC = "swarm.status"


def _seconds(name: str, value: Any, *, optional: bool = False, zero: bool = False) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or value < 0 or (value == 0 and not zero):
        more = "" if not optional else " or null"
        raise ConfigError(f"swarm: {name} must be {'non-negative' if zero else 'positive'} seconds{more}, "
                          f"got {value!r}")
    return float(value)


def _sites(name: str, value: Any, known: list[str]) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(s, str) and s for s in value):
        raise ConfigError(f"swarm: {name} must be a non-empty list of site names, got {value!r}")
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise ConfigError(f"swarm: {name} names {unknown}, which are not sites of the swarm {known}")
    return sorted(set(value))


@dataclass(frozen=True)
class SwarmConfig:
    """Everything a site needs to play its part in every round (JSON in the assignment)."""

    sites: list[str]
    num_rounds: int
    learner: str
    aggr_clients: list[str] = field(default_factory=list)
    train_clients: list[str] = field(default_factory=list)
    result_clients: list[str] = field(default_factory=list)
    starting_client: str = ""
    task_name_prefix: str = "swarm"
    learn_task_name: str = "train"
    learner_args: dict[str, Any] = field(default_factory=dict)
    aggregator: str = "weighted_mean"
    metric_comparator: str = "greater"
    learn_task_check_interval: float = 0.1
    learn_task_abort_timeout: float = 5.0
    learn_task_ack_timeout: float = 10.0
    learn_task_timeout: float | None = None
    final_result_ack_timeout: float = 10.0
    min_responses_required: int = 1
    wait_time_after_min_resps_received: float = 10.0
    request_to_submit_result_interval: float = 0.2
    request_to_submit_result_msg_timeout: float = 10.0
    request_to_submit_result_max_wait: float | None = None
    max_concurrent_submissions: int = 1
    memory_gc_rounds: int = 1
    cuda_empty_cache: bool = False
    aggregator_timeout: float = 30.0
    grant_timeout: float = 120.0
    #: seed of the aggregator choice of each round (the job id by default)
    seed: str = ""

    @classmethod
    def from_json(cls, value: Any) -> SwarmConfig:
        """Check a configuration (JSON) and fill the defaults that depend on the sites."""
        if not isinstance(value, dict):
            raise ConfigError(f"swarm: the configuration must be a mapping, got {type(value).__name__}")
        names = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(value) - names)
        if unknown:
            raise ConfigError(f"swarm: unknown parameter(s) {unknown} (known: {', '.join(sorted(names))})")
        sites = value.get("sites")
        if not isinstance(sites, list) or not sites or not all(isinstance(s, str) and s for s in sites):
            raise ConfigError(f"swarm: sites must be a non-empty list of site names, got {sites!r}")
        sites = sorted(set(sites))
        rounds = value.get("num_rounds")
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise ConfigError(f"swarm: num_rounds must be an integer >= 1, got {rounds!r}")
        learner = value.get("learner")
        if not isinstance(learner, str) or ":" not in learner:
            raise ConfigError(f"swarm: learner must be 'package.module:function', got {learner!r}")
        kw: dict[str, Any] = {"sites": sites, "num_rounds": rounds, "learner": learner}
        for name in ("aggr_clients", "train_clients", "result_clients"):
            kw[name] = _sites(name, value[name], sites) if value.get(name) else list(sites)
        start = value.get("starting_client") or kw["aggr_clients"][0]
        if start not in kw["aggr_clients"]:
            raise ConfigError(f"swarm: starting_client {start!r} must be one of aggr_clients {kw['aggr_clients']}")
        kw["starting_client"] = start
        for name in ("task_name_prefix", "learn_task_name", "aggregator", "metric_comparator", "seed"):
            if name in value:
                if not isinstance(value[name], str):
                    raise ConfigError(f"swarm: {name} must be a string, got {value[name]!r}")
                kw[name] = value[name]
        if kw.get("metric_comparator", "greater") not in ("greater", "less") and ":" not in kw["metric_comparator"]:
            raise ConfigError(f"swarm: metric_comparator must be 'greater', 'less' or 'package.module:function', "
                              f"got {kw['metric_comparator']!r}")
        if kw.get("aggregator", "weighted_mean") != "weighted_mean" and ":" not in kw["aggregator"]:
            raise ConfigError(f"swarm: aggregator must be 'weighted_mean' or 'package.module:function', "
                              f"got {kw['aggregator']!r}")
        args = value.get("learner_args", {})
        if not isinstance(args, dict):
            raise ConfigError(f"swarm: learner_args must be a mapping, got {args!r}")
        kw["learner_args"] = args
        for name in ("learn_task_check_interval", "learn_task_abort_timeout", "learn_task_ack_timeout",
                     "final_result_ack_timeout", "request_to_submit_result_interval",
                     "request_to_submit_result_msg_timeout", "aggregator_timeout", "grant_timeout"):
            if name in value:
                kw[name] = _seconds(name, value[name])
        if "wait_time_after_min_resps_received" in value:
            kw["wait_time_after_min_resps_received"] = _seconds(
                "wait_time_after_min_resps_received", value["wait_time_after_min_resps_received"], zero=True)
        for name in ("learn_task_timeout", "request_to_submit_result_max_wait"):
            if name in value:
                kw[name] = _seconds(name, value[name], optional=True)
        for name, low in (("min_responses_required", 1), ("max_concurrent_submissions", 1),
                          ("memory_gc_rounds", 0)):
            if name in value:
                v = value[name]
                if isinstance(v, bool) or not isinstance(v, int) or v < low:
                    raise ConfigError(f"swarm: {name} must be an integer >= {low}, got {v!r}")
                kw[name] = v
        if kw.get("min_responses_required", 1) > len(kw["train_clients"]):
            raise ConfigError(f"swarm: min_responses_required={kw['min_responses_required']} exceeds the "
                              f"{len(kw['train_clients'])} train_clients; no round could ever finish")
        if "cuda_empty_cache" in value:
            if not isinstance(value["cuda_empty_cache"], bool):
                raise ConfigError(f"swarm: cuda_empty_cache must be true or false, got {value['cuda_empty_cache']!r}")
            kw["cuda_empty_cache"] = value["cuda_empty_cache"]
        return cls(**kw)

    def to_json(self) -> dict[str, Any]:
        """The configuration as JSON (what the workflow hands out and the sites record)."""
        return asdict(self)
