"""SwarmConfig: the reference's parameters, checked before anything is recorded."""

from __future__ import annotations

from typing import Any

import pytest

from engine.errors import ConfigError
from engine.swarm.config import SwarmConfig

SITES = ["site-1", "site-2", "site-3"]


def config(**kw: Any) -> dict[str, Any]:
    return {"sites": SITES, "num_rounds": 2, "learner": "engine.jobs.cnn:swarm_learn", **kw}


def test_defaults_fill_roles_from_the_sites() -> None:
    cfg = SwarmConfig.from_json(config())
    assert cfg.aggr_clients == cfg.train_clients == cfg.result_clients == SITES
    assert cfg.starting_client == "site-1"
    assert cfg.max_concurrent_submissions == 1 and cfg.learn_task_timeout is None
    assert SwarmConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize(("kw", "message"), [
    ({"num_rounds": 0}, "num_rounds must be an integer >= 1"),
    ({"learner": "nomodule"}, "learner must be 'package.module:function'"),
    ({"aggr_clients": ["site-9"]}, "not sites of the swarm"),
    ({"starting_client": "site-3", "aggr_clients": ["site-1"]}, "starting_client 'site-3' must be one of"),
    ({"min_responses_required": 4}, "exceeds the 3 train_clients"),
    ({"max_concurrent_submissions": 0}, "max_concurrent_submissions must be an integer >= 1"),
    ({"learn_task_ack_timeout": -1}, "learn_task_ack_timeout must be positive seconds"),
    ({"learn_task_timeout": "soon"}, "learn_task_timeout must be positive seconds or null"),
    ({"metric_comparator": "bigger"}, "metric_comparator must be 'greater', 'less'"),
    ({"aggregator": "median"}, "aggregator must be 'weighted_mean'"),
    ({"persistor_id": "x"}, "unknown parameter(s) ['persistor_id']"),
    ({"cuda_empty_cache": "yes"}, "cuda_empty_cache must be true or false"),
])
def test_bad_parameters_are_named(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        SwarmConfig.from_json(config(**kw))
    assert message in str(info.value)
