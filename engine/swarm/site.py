"""The swarm job's executor on every site: ``engine.swarm.site:run``.

The server's ``swarm`` workflow sends two tasks (named after ``task_name_prefix``):

- ``<prefix>_config``: the site checks the configuration and that its learner
  imports, and answers with its name (the reference's configure step);
- ``<prefix>_run``: the site plays its rounds (``SwarmClientController``) until the
  swarm ends, and answers with how it ended: the last and best models' hashes (and,
  on a result client, the models themselves). Round 0's learn task comes with it:
  ``starting_client`` aggregates round 0, and each aggregator picks the next.

After a crash the agent runs ``<prefix>_run`` again; the controller resumes every
round from the site's log.
"""

from __future__ import annotations

from typing import Any

from engine.client.executor import SiteTask, load_callable
from engine.errors import ConfigError, TaskError
from engine.swarm.config import SwarmConfig
from engine.swarm.controller import STATUS_TOPIC, SwarmClientController, SwarmFailed
from engine.tensors import ref

__all__ = ["controller_for", "run"]

#: one controller per (site engine, job): a re-run of the assignment in the same process reuses it
_CONTROLLERS: dict[int, SwarmClientController] = {}


def controller_for(task: SiteTask, config: SwarmConfig) -> SwarmClientController:
    """The site's controller for the task's job (its handlers registered once on the site's engine)."""
    engine = task.engine
    payloads = getattr(engine, "payloads", None)
    if engine is None or payloads is None or payloads.runtime is None:
        raise ConfigError("a swarm site needs the agent's engine, chunk store and log (run it under `fedlog client`)")
    found = _CONTROLLERS.get(id(engine))
    if found is not None:
        found.config = config
        return found

    def send(target: str, topic: str, request: Any, timeout: float) -> dict[str, Any]:
        envelope: dict[str, Any] = engine.send_aux_request([target], topic, request, timeout)[target]
        return envelope

    def report(status: dict[str, Any]) -> None:
        engine.fire_and_forget_aux_request(["server"], STATUS_TOPIC, {**status, "job_id": task.job_id})

    ctl = SwarmClientController(config, site=task.site, job_id=task.job_id, runtime=payloads.runtime,
                                store=payloads.store, api=payloads.api, send=send, engine=engine, report=report)
    ctl.register(engine)
    _CONTROLLERS[id(engine)] = ctl
    return ctl


def run(task: SiteTask) -> dict[str, Any]:
    """The executor of a swarm job: configure, or run the site's rounds to the swarm's end."""
    data = task.data if isinstance(task.data, dict) else {}
    raw = data.get("config")
    if isinstance(raw, dict) and not raw.get("sites"):  # the configure step: the swarm is the job's sites
        raw = {**raw, "sites": list(task.job_sites) or [task.site]}
    config = SwarmConfig.from_json(raw)
    if task.name == f"{config.task_name_prefix}_config":
        load_callable(config.learner, "swarm learner")  # fail here, before any round, if it cannot import
        if task.site not in config.sites:
            raise TaskError("config.sites", f"{task.site} is not one of the swarm's sites {config.sites}")
        return {"site": task.site, "trainer": task.site in config.train_clients,
                "aggregator": task.site in config.aggr_clients}
    if task.name != f"{config.task_name_prefix}_run":
        raise TaskError("name", f"a swarm site runs {config.task_name_prefix}_config and "
                                f"{config.task_name_prefix}_run, not {task.name!r}")
    digest = data.get("model_digest")
    if not isinstance(digest, str):
        raise TaskError("data.model_digest", "the swarm's initial model hash is missing")
    ctl = controller_for(task, config)
    initial = {"round": 0, "aggregator": config.starting_client, "model": ref(digest), "best": None,
               "trainers": list(config.train_clients)}
    engine = task.engine
    assert engine is not None  # controller_for checked it
    try:
        return ctl.run(initial, should_stop=lambda: bool(engine.aborted) or engine.stopping)
    except SwarmFailed as exc:
        return {"status": "failed", "reason": str(exc)}
