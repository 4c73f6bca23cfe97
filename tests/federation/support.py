"""Shared pieces of the federation tests: a provisioned federation, executors, agents in threads."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.client.agent import SiteAgent
from engine.client.api import SiteApi
from engine.client.executor import SiteTask
from engine.provision import SERVER_DIR, load_identity, provision

#: each site's example count and the offset its "training" adds to every weight
N = {"site-1": 1, "site-2": 1, "site-3": 2}
OFFSET = {"site-1": 1.0, "site-2": 2.0, "site-3": 4.0}
SITES = tuple(sorted(N))


def train(task: SiteTask) -> Any:
    """A site's FedAvg training: add its offset to every weight; report its example count."""
    model = task.data["model"]
    out = {k: [x + OFFSET[task.site] for x in v] if isinstance(v, list) else v + OFFSET[task.site]
           for k, v in model.items()}
    return {"model": out, "n": N[task.site]}


EXECUTOR = "tests.federation.support:train"


@dataclass
class Federation:
    """A provisioned folder: the server's credentials and one identity per site plus the admin."""

    root: Path

    @property
    def server_dir(self) -> Path:
        return self.root / SERVER_DIR

    def token(self, name: str) -> str:
        return load_identity(self.root / name).token


def make_federation(tmp: Path, sites: tuple[str, ...] = SITES) -> Federation:
    provision(tmp / "fed", list(sites))
    return Federation(tmp / "fed")


def wait_until(condition: Callable[[], Any], timeout: float = 30.0) -> Any:
    """Poll ``condition`` until it is truthy (a hang fails the test instead of blocking it)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"condition not met within {timeout} s")


@contextmanager
def agents_running(apis: dict[str, SiteApi], logs: Path, **kw: Any) -> Iterator[dict[str, SiteAgent]]:
    """One agent thread per site until the block ends."""
    agents = {site: SiteAgent(api, logs / f"{site}.db", poll_wait=kw.pop("poll_wait", 2.0), **kw)
              for site, api in apis.items()}
    threads = [threading.Thread(target=agent.run, name=f"agent-{site}", daemon=True)
               for site, agent in agents.items()]
    for t in threads:
        t.start()
    try:
        yield agents
    finally:
        for agent in agents.values():
            agent.stop()
        for t in threads:
            t.join(30)
        for agent in agents.values():
            agent.close()


def broken_workflow(ctl: Any, **_: Any) -> None:
    """A workflow that fails before scheduling anything."""
    raise ValueError("the data set is missing")


def train_and_report(task: SiteTask) -> Any:
    """``train``, after telling the server (an aux request) which sites the engine says are in the job."""
    assert task.engine is not None
    reply = task.engine.send_aux_request(["server"], "progress", {"sites": task.engine.get_job_clients(),
                                                                  "task": task.engine.get_task_assignment().task_id},
                                         timeout=10)
    assert reply["server"]["status"] == "ok", reply
    return train(task)
