"""The server side of swarm learning: configure the sites, start the swarm, wait for its end.

In swarm learning the sites run the rounds among themselves (``engine.swarm``); the
server relays their messages and chunks and runs this workflow, which is replayed
after a server crash like any other:

1. ``<prefix>_config`` goes to every site of the job: each checks the configuration
   and that its learner imports, and answers (the sites that answer are the swarm);
2. the initial model is made on the server and stored by hash;
3. ``<prefix>_run`` goes to every swarm site with the configuration and round 0's
   model: each plays its rounds and answers when the swarm ended (the first answer
   starts a ``final_result_ack_timeout`` wait for the others, so a site that left
   does not hold the job);
4. the last and best models are published; a failed swarm fails the job with the
   reason the sites recorded.

Sites report each round's state to the server as they go (aux topic
``swarm.status``, recorded as ``aux`` machines in the server's log): while the
server is down they keep training and gathering, and its view catches up when it
returns. ``latest_status`` is the board of the newest report per site.
"""

from __future__ import annotations

import threading
from typing import Any

from engine.errors import EngineError
from engine.tasks import Task
from engine.tensors import ref_digest
from engine.workflows.controller import Controller

__all__ = ["SwarmStatusBoard", "swarm"]

_PARAMS = ("aggr_clients", "train_clients", "result_clients", "starting_client", "task_name_prefix",
           "learn_task_name", "aggregator", "metric_comparator", "learn_task_check_interval",
           "learn_task_abort_timeout", "learn_task_ack_timeout", "learn_task_timeout", "final_result_ack_timeout",
           "min_responses_required", "wait_time_after_min_resps_received", "request_to_submit_result_interval",
           "request_to_submit_result_msg_timeout", "request_to_submit_result_max_wait",
           "max_concurrent_submissions", "memory_gc_rounds", "cuda_empty_cache", "aggregator_timeout",
           "grant_timeout", "seed")


def swarm(ctl: Controller, model: str, learner: str, num_rounds: int = 3, model_args: dict[str, Any] | None = None,
          evaluate: str | None = None, sites: list[str] | None = None, learner_args: dict[str, Any] | None = None,
          **params: Any) -> dict[str, Any]:
    """Swarm learning over the job's sites (``params``: the ``SwarmClientController`` parameters).

    ``model`` names a function making the initial state_dict (with ``model_args``),
    ``learner`` the function each site trains with (a ``SiteTask`` executor returning
    ``{"model", "n", "metric"}``), ``evaluate`` optionally one scoring the final model
    on the server.
    """
    from engine.swarm.config import SwarmConfig

    unknown = sorted(set(params) - set(_PARAMS))
    if unknown:
        raise EngineError(f"swarm: unknown parameter(s) {unknown} (known: {', '.join(_PARAMS)})")
    prefix = str(params.get("task_name_prefix", "swarm"))
    draft = {**params, "sites": sites or ["-"], "num_rounds": num_rounds, "learner": learner,
             "learner_args": learner_args or {}, "seed": params.get("seed") or ctl.job_id}
    if sites:
        SwarmConfig.from_json(draft)  # a bad parameter fails the job before any site is asked
    # before the sites are known each site checks the configuration against the job's sites
    answered = ctl.broadcast_and_wait(Task(f"{prefix}_config", data={"config": {**draft, "sites": sites}}),
                                      targets=sites)
    members = sorted(answered.by_site())
    if not members:
        raise EngineError("swarm: no site answered the configuration task")
    config = SwarmConfig.from_json({**draft, "sites": members})
    ctl.logger.info("swarm of %s: %d round(s), aggregators %s, starting at %s", members, config.num_rounds,
                    config.aggr_clients, config.starting_client)
    initial = ctl.make_tensors(model, model_args)
    outcome = ctl.broadcast_and_wait(
        Task(f"{prefix}_run", data={"config": config.to_json(), "model": initial,
                                    "model_digest": ref_digest(initial)}),
        targets=members, min_responses=1, wait_time_after_min_received=config.final_result_ack_timeout)
    ends = outcome.by_site()
    failed = {s: e for s, e in ends.items() if not isinstance(e, dict) or e.get("status") != "done"}
    if failed:
        site, end = sorted(failed.items())[0]
        reason = end.get("reason") if isinstance(end, dict) else repr(end)
        raise EngineError(f"swarm failed ({site}): {reason}")
    hashes = sorted({str(e.get("model_hash")) for e in ends.values()})
    if len(hashes) != 1:
        raise EngineError(f"swarm: the sites ended with different final models {hashes}")
    first = ends[sorted(ends)[0]]
    summary = {"model_hash": hashes[0], "best_hash": first.get("best_hash"), "best_metric": first.get("best_metric"),
               "best_round": first.get("best_round"), "sites": sorted(ends)}
    ctl.publish(summary, round=config.num_rounds - 1)
    holder = next((e for s, e in sorted(ends.items()) if isinstance(e.get("model"), dict)), None)
    result: dict[str, Any] = {**summary, "rounds": config.num_rounds}
    if holder is not None:
        result["model"] = holder["model"]
        if isinstance(holder.get("best_model"), dict):
            result["best_model"] = holder["best_model"]
        if evaluate is not None:
            result["metrics"] = ctl.call_on_tensors(evaluate, holder["model"])
    return result


class SwarmStatusBoard:
    """The newest status report of each site of each swarm job (the server's aux handler)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._board: dict[str, dict[str, dict[str, Any]]] = {}

    def handle(self, topic: str, request: Any, sender: str) -> dict[str, Any]:
        if not isinstance(request, dict):
            return {"status": "bad_request"}
        job = str(request.get("job_id") or "")
        with self._lock:
            self._board.setdefault(job, {})[sender] = dict(request)
        return {"status": "ok"}

    def latest_status(self, job_id: str) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {site: dict(v) for site, v in self._board.get(job_id, {}).items()}
