"""The job lifecycle on the server: order, abort, deployment timeout, lost sites, failing workflows.

Time is a ManualClock (the runtime's timer thread fires when the test moves it), the
sites are the real client API against the app in-process.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.client.api import AdminApi, SiteApi
from engine.client.transport import AsgiTransport
from engine.clock import ManualClock
from engine.errors import RemoteError
from engine.server.service import FedServer, ServerSettings
from tests.federation.support import EXECUTOR, SITES, Federation, make_federation, train, wait_until

MODEL = {"w": [0.0, 1.0], "b": 0.5}


@pytest.fixture
def fed(tmp_path: Path) -> Federation:
    return make_federation(tmp_path)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def server(tmp_path: Path, fed: Federation, clock: ManualClock) -> FedServer:
    settings = ServerSettings(heartbeat_timeout=10, dead_grace=10, client_dead_grace=5)
    return FedServer(tmp_path / "server.db", fed.server_dir, settings=settings, clock=clock)


@pytest.fixture
def base(server: FedServer, fed: Federation) -> Iterator[AsgiTransport]:
    with AsgiTransport(server.app, fed.token("admin")) as transport:
        yield transport


@pytest.fixture
def sites(base: AsgiTransport, fed: Federation) -> dict[str, SiteApi]:
    return {s: SiteApi(base.with_token(fed.token(s)), s) for s in SITES}


def fedavg(rounds: int = 1, **kw: Any) -> dict[str, Any]:
    return {"workflow": "fedavg", "executor": EXECUTOR, "args": {"model": MODEL, "rounds": rounds}, **kw}


def serve_once(api: SiteApi) -> bool:
    """The site takes one assignment, if any, and answers it with the test executor."""
    from engine.client.executor import SiteTask

    a = api.poll(0)["assignment"]
    if a is None:
        return False
    task = SiteTask(a["job_id"], a["task_id"], a["client_task_id"], a["name"], a["data"], a["props"], api.site)
    api.submit(a["task_id"], a["client_task_id"], train(task))
    return True


def state(admin: AdminApi, job_id: str) -> str:
    return str(admin.show_job(job_id)["state"])


def test_jobs_run_one_after_another(base: AsgiTransport, sites: dict[str, SiteApi]) -> None:
    admin = AdminApi(base)
    for api in sites.values():
        api.heartbeat()
    first = admin.submit_job(fedavg(min_sites=3))["job_id"]
    second = admin.submit_job(fedavg(rounds=2, min_sites=3))["job_id"]
    wait_until(lambda: admin.show_job(first)["current_task"])
    assert state(admin, second) == "submitted"  # waits for the first job
    wait_until(lambda: any([serve_once(api) for api in sites.values()]) and state(admin, first) == "finished")
    wait_until(lambda: [serve_once(api) for api in sites.values()] and state(admin, second) == "finished")
    assert [j["job_id"] for j in admin.list_jobs()] == [first, second]
    assert admin.job_result(second)["result"] is not None
    assert admin.show_job(second)["rounds"] == 2


def test_abort_ends_the_running_job_and_its_tasks(server: FedServer, base: AsgiTransport,
                                                   sites: dict[str, SiteApi]) -> None:
    admin = AdminApi(base)
    for api in sites.values():
        api.heartbeat()
    job = admin.submit_job(fedavg(min_sites=3))["job_id"]
    task = wait_until(lambda: admin.show_job(job)["current_task"])
    aborted = admin.abort_job(job, "operator said so")
    assert aborted["state"] == "aborted" and aborted["reason"] == "operator said so"
    assert server.recorder.get_machine(task["task_id"]).state == "aborted"  # type: ignore[union-attr]
    assert sites["site-1"].poll(0)["assignment"] is None
    with pytest.raises(RemoteError) as err:
        admin.abort_job(job)
    assert err.value.status == 409
    with pytest.raises(RemoteError) as err:
        admin.show_job("job-99")
    assert err.value.status == 404


def test_deployment_times_out_without_enough_sites(base: AsgiTransport, sites: dict[str, SiteApi],
                                                   clock: ManualClock) -> None:
    admin = AdminApi(base)
    sites["site-1"].heartbeat()
    job = admin.submit_job(fedavg(min_sites=2, deploy_timeout=30))["job_id"]
    wait_until(lambda: state(admin, job) == "deploying")
    clock.advance(31)
    wait_until(lambda: state(admin, job) == "failed")
    assert "deployment timed out" in admin.show_job(job)["reason"]


def test_a_job_fails_when_a_required_site_dies(base: AsgiTransport, sites: dict[str, SiteApi],
                                               clock: ManualClock) -> None:
    admin = AdminApi(base)
    for api in sites.values():
        api.heartbeat()
    job = admin.submit_job(fedavg(min_sites=2, required_sites=["site-3"]))["job_id"]
    wait_until(lambda: admin.show_job(job)["current_task"])
    for _ in range(4):  # site-1 and site-2 stay in touch; site-3 goes silent past both graces
        clock.advance(6)
        sites["site-1"].heartbeat()
        sites["site-2"].heartbeat()
    wait_until(lambda: {s["site"]: s["state"] for s in admin.sites()}["site-3"] == "dead")
    wait_until(lambda: state(admin, job) == "failed")
    assert {s["site"]: s["state"] for s in admin.sites()} == {"site-1": "active", "site-2": "active", "site-3": "dead"}
    assert admin.show_job(job)["reason"] == "required site(s) site-3 dead"


def test_a_workflow_that_raises_fails_its_job_with_the_reason(base: AsgiTransport,
                                                               sites: dict[str, SiteApi]) -> None:
    admin = AdminApi(base)
    sites["site-1"].heartbeat()
    job = admin.submit_job({"workflow": "tests.federation.support:broken_workflow", "executor": EXECUTOR})["job_id"]
    wait_until(lambda: state(admin, job) == "failed")
    assert admin.show_job(job)["reason"].endswith("ValueError: the data set is missing")


def test_watching_a_job_answers_as_soon_as_it_changes(base: AsgiTransport, sites: dict[str, SiteApi]) -> None:
    """``GET /v1/jobs/{id}?wait=&seen=`` is a long poll: nothing new waits, a recorded change answers."""
    from concurrent.futures import ThreadPoolExecutor

    admin = AdminApi(base)
    for api in sites.values():
        api.heartbeat()
    job_id = admin.submit_job(fedavg(min_sites=3))["job_id"]
    wait_until(lambda: admin.show_job(job_id)["current_task"])
    first, tag = admin.watch_job(job_id, None, 25)  # nothing seen yet: answered at once
    assert tag is not None and first["current_task"]["results"] == 0
    same, same_tag = admin.watch_job(job_id, tag, 0.2)  # nothing happened: the same job after the wait
    assert same_tag == tag and same == first
    with ThreadPoolExecutor(max_workers=1) as pool:
        watching = pool.submit(admin.watch_job, job_id, tag, 25)
        assert serve_once(sites["site-1"])
        # answered by the result, long before the 25 s wait runs out
        changed, new_tag = watching.result(timeout=10)
    assert new_tag != tag and changed["current_task"]["results"] == 1
    assert admin.watch_job(job_id, "stale", 25)[1] == new_tag  # an ETag that is not the job's: at once
    for bad in (-1, 31, "soon"):
        with pytest.raises(RemoteError) as err:
            base.request("GET", f"/v1/jobs/{job_id}", query={"wait": bad})
        assert err.value.status == 422
    with pytest.raises(RemoteError) as err:
        admin.watch_job("job-99", None, 1)
    assert err.value.status == 404
