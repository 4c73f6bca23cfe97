"""Ready-made job specs, by name (``fedlog simulate fedstats``, ``fedlog job submit linreg``)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import orjson
import yaml

from engine.errors import ConfigError
from engine.jobs.linreg import initial_model

__all__ = ["CATALOG", "load_spec"]

CATALOG: dict[str, dict[str, Any]] = {
    "fedstats": {
        "name": "federated statistics (wine)",
        "workflow": "fedstats",
        "executor": "engine.jobs.fedstats:site_stats",
        "args": {"dataset": "wine", "bins": 10},
    },
    "cnn": {
        "name": "FedAvg CNN on handwritten digits (PyTorch)",
        "workflow": "fedavg_torch",
        "executor": "engine.jobs.cnn:train",
        "args": {"model": "engine.jobs.cnn:initial_state", "evaluate": "engine.jobs.cnn:evaluate",
                 "rounds": 5, "epochs": 4, "lr": 0.05, "batch": 32},
    },
    "swarm": {
        "name": "Swarm learning CNN on handwritten digits (PyTorch)",
        "workflow": "swarm",
        "executor": "engine.swarm.site:run",
        "args": {"model": "engine.jobs.cnn:initial_state", "learner": "engine.jobs.cnn:swarm_learn",
                 "evaluate": "engine.jobs.cnn:evaluate", "num_rounds": 5,
                 "learner_args": {"epochs": 4, "lr": 0.05, "batch": 32},
                 "min_responses_required": 2, "wait_time_after_min_resps_received": 5,
                 "aggregator_timeout": 20},
    },
    "linreg": {
        "name": "FedAvg linear regression (diabetes)",
        "workflow": "fedavg",
        "executor": "engine.jobs.linreg:train",
        "args": {"model": initial_model(), "rounds": 5},
    },
}


def load_spec(ref: str) -> dict[str, Any]:
    """A job spec: a catalog name, or a JSON/YAML file holding one."""
    if ref in CATALOG:
        return copy.deepcopy(CATALOG[ref])
    path = Path(ref)
    if not path.is_file():
        raise ConfigError(f"job {ref!r} is neither a built-in job ({', '.join(sorted(CATALOG))}) nor a file")
    text = path.read_text(encoding="utf-8")
    try:
        spec = orjson.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (orjson.JSONDecodeError, yaml.YAMLError) as exc:
        kind = "JSON" if path.suffix == ".json" else "YAML"
        raise ConfigError(f"job file {path}: not valid {kind}: {exc}") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"job file {path}: must hold a mapping (the job spec), got {type(spec).__name__}")
    return spec
