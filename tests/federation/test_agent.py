"""The site agent: its local log, idempotent re-submission, dropped results, retries and backoff."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.client.agent import Backoff, SiteAgent
from engine.client.api import AdminApi, SiteApi
from engine.client.executor import SiteTask
from engine.client.transport import AsgiTransport
from engine.errors import AuthError, LeaseHeld, TransportError
from engine.server.service import FedServer
from tests.federation.support import EXECUTOR, SITES, Federation, make_federation, train, wait_until

MODEL = {"w": [0.0, 1.0], "b": 0.5}


@pytest.fixture
def fed(tmp_path: Path) -> Federation:
    return make_federation(tmp_path)


@pytest.fixture
def server(tmp_path: Path, fed: Federation) -> FedServer:
    return FedServer(tmp_path / "server.db", fed.server_dir)


@pytest.fixture
def base(server: FedServer, fed: Federation) -> Iterator[AsgiTransport]:
    with AsgiTransport(server.app, fed.token("admin")) as transport:
        yield transport


def api(base: AsgiTransport, fed: Federation, site: str) -> SiteApi:
    return SiteApi(base.with_token(fed.token(site)), site)


def start(base: AsgiTransport, fed: Federation, rounds: int = 1) -> str:
    for site in SITES:
        api(base, fed, site).heartbeat()
    admin = AdminApi(base)
    job = admin.submit_job({"workflow": "fedavg", "executor": EXECUTOR, "min_sites": 3,
                            "args": {"model": MODEL, "rounds": rounds}})["job_id"]
    wait_until(lambda: admin.show_job(job)["current_task"])
    return str(job)


def triggers(agent: SiteAgent, ct_id: str) -> list[str]:
    return [e.trigger for e in agent.recorder.read(machine_id=ct_id)]


class Crash(BaseException):
    """Stands for the process dying between computing and submitting."""


def test_a_result_computed_before_a_crash_is_resubmitted_not_recomputed(tmp_path: Path, base: AsgiTransport,
                                                                        fed: Federation, server: FedServer) -> None:
    start(base, fed)
    site_api = api(base, fed, "site-1")
    calls: list[str] = []

    def executor(task: SiteTask) -> Any:
        calls.append(task.client_task_id)
        return train(task)

    agent = SiteAgent(site_api, tmp_path / "site-1.db", executor=executor, poll_wait=0)
    agent._submit = lambda *a: (_ for _ in ()).throw(Crash())  # type: ignore[method-assign]
    with pytest.raises(Crash):
        agent.run(max_assignments=1)
    ct_id = calls[0]
    assert triggers(agent, ct_id) == ["create", "compute"]
    agent.close()

    again = SiteAgent(site_api, tmp_path / "site-1.db", executor=executor, poll_wait=0)
    assert again.resubmit_pending() == 1
    assert calls == [ct_id]  # not computed again
    assert triggers(again, ct_id) == ["create", "compute", "acknowledge"]
    # the server counted it once; a further resend of the same result is a duplicate
    assert [e.trigger for e in server.recorder.read(machine_id=ct_id)].count("result") == 1
    assert site_api.submit(ct_id.split("/")[0], ct_id, train_result(again, ct_id))["outcome"] == "duplicate"
    again.close()


def train_result(agent: SiteAgent, ct_id: str) -> Any:
    return agent._stored_result(ct_id)


def test_a_failing_executor_is_recorded_and_retried(tmp_path: Path, base: AsgiTransport, fed: Federation) -> None:
    start(base, fed)
    attempts: list[int] = []

    def flaky(task: SiteTask) -> Any:
        attempts.append(task.send_count)
        if len(attempts) == 1:
            raise RuntimeError("GPU fell off the bus")
        return train(task)

    agent = SiteAgent(api(base, fed, "site-2"), tmp_path / "site-2.db", executor=flaky, poll_wait=0,
                      backoff=Backoff(base=0.001, cap=0.001))
    agent.run(max_assignments=2)
    ct_id = "job-1.t1/site-2"
    assert triggers(agent, ct_id) == ["create", "fail", "retry", "compute", "acknowledge"]
    assert attempts == [1, 2]  # the second try is the server's re-send of the same assignment
    assert agent.stats.failed == 1 and agent.stats.submitted == 1
    agent.close()


def test_a_second_agent_on_the_same_log_is_refused(tmp_path: Path, base: AsgiTransport, fed: Federation) -> None:
    first = SiteAgent(api(base, fed, "site-1"), tmp_path / "site-1.db")
    with pytest.raises(LeaseHeld):
        SiteAgent(api(base, fed, "site-1"), tmp_path / "site-1.db")
    first.close()


def test_a_refused_credential_stops_the_agent(tmp_path: Path, base: AsgiTransport, fed: Federation) -> None:
    wrong = SiteApi(base.with_token(fed.token("site-2")), "site-1")
    agent = SiteAgent(wrong, tmp_path / "site-1.db", poll_wait=0)
    with pytest.raises(AuthError):
        agent.run(max_assignments=1)
    agent.close()


class Unreachable:
    """A transport to a server that is down for the first ``down`` requests."""

    def __init__(self, inner: Any, down: int) -> None:
        self.inner, self.down, self.calls = inner, down, 0

    def request(self, method: str, path: str, **kw: Any) -> Any:
        self.calls += 1
        if self.calls <= self.down:
            raise TransportError(method, path, "connection refused", maybe_processed=False)
        return self.inner.request(method, path, **kw)

    def close(self) -> None:
        pass


def test_an_unreachable_server_is_retried_with_growing_backoff(tmp_path: Path, base: AsgiTransport,
                                                               fed: Federation) -> None:
    start(base, fed)
    transport = Unreachable(base.with_token(fed.token("site-3")), down=5)
    delays: list[float] = []
    backoff = Backoff(base=0.001, cap=0.004, rng=random.Random(1))
    original = backoff.next_delay

    def record() -> float:
        delays.append(original())
        return delays[-1]

    backoff.next_delay = record  # type: ignore[method-assign]
    agent = SiteAgent(SiteApi(transport, "site-3"), tmp_path / "site-3.db", executor=train, poll_wait=0,
                      backoff=backoff)
    agent.run(max_assignments=1)
    assert agent.stats.reconnects == 5 and agent.stats.submitted == 1
    ceilings = [min(0.004, 0.001 * 2**n) for n in range(5)]
    assert all(c / 2 <= d <= c for d, c in zip(delays, ceilings, strict=True)), delays
    assert backoff.attempt == 0  # reset once the server answered
    agent.close()


def test_backoff_grows_to_its_cap_with_jitter() -> None:
    backoff = Backoff(base=0.1, cap=1.0, rng=random.Random(0))
    delays = [backoff.next_delay() for _ in range(8)]
    assert 0.05 <= delays[0] <= 0.1 and all(0.5 <= d <= 1.0 for d in delays[4:])
    backoff.reset()
    assert backoff.next_delay() <= 0.1
