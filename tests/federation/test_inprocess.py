"""The whole federation in one process: the real client against the app through AsgiTransport."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from engine.client.api import AdminApi, SiteApi
from engine.client.transport import AsgiTransport
from engine.server.service import FedServer
from tests.federation.support import EXECUTOR, SITES, agents_running, make_federation

MODEL = {"w": [0.0, 1.0], "b": 0.5}
FEDAVG_3 = {"w": [8.25, 9.25], "b": 8.75}


def wait_for_end(admin: AdminApi, job_id: str, timeout: float = 60.0) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        job = admin.show_job(job_id)
        if job["state"] in ("finished", "failed", "aborted"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not end: {admin.show_job(job_id)}")


def test_fedavg_job_runs_through_the_http_api(tmp_path: Path) -> None:
    fed = make_federation(tmp_path)
    server = FedServer(tmp_path / "server.db", fed.server_dir)
    with AsgiTransport(server.app, fed.token("admin")) as base:
        admin = AdminApi(base)
        apis = {s: SiteApi(base.with_token(fed.token(s)), s) for s in SITES}
        with agents_running(apis, tmp_path):
            job = admin.submit_job({"workflow": "fedavg", "executor": EXECUTOR, "min_sites": 3,
                                    "args": {"model": MODEL, "rounds": 3}})
            done = wait_for_end(admin, job["job_id"])
        assert done["state"] == "finished", done
        assert admin.job_result(job["job_id"])["result"] == FEDAVG_3
        assert done["rounds"] == 3


def test_executors_reach_the_server_through_the_site_engine(tmp_path: Path) -> None:
    fed = make_federation(tmp_path)
    server = FedServer(tmp_path / "server.db", fed.server_dir)
    reports: list[tuple[str, Any]] = []
    server.aux.register_handler("progress", lambda topic, request, sender: reports.append((sender, request)))
    with AsgiTransport(server.app, fed.token("admin")) as base:
        admin = AdminApi(base)
        apis = {s: SiteApi(base.with_token(fed.token(s)), s) for s in SITES}
        with agents_running(apis, tmp_path):
            job = admin.submit_job({"workflow": "fedavg", "executor": "tests.federation.support:train_and_report",
                                    "min_sites": 3, "args": {"model": MODEL, "rounds": 2}})
            done = wait_for_end(admin, job["job_id"])
    assert done["state"] == "finished", done
    assert sorted(site for site, _ in reports) == sorted(SITES * 2)
    assert all(r["sites"] == list(SITES) and r["task"].startswith("job-1.t") for _, r in reports)
