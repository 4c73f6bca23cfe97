"""Identity and access on the federation routes: a site sees and answers only its own work.

Refusals answer 401/403 with a clear message and record one ``audit`` event; nothing
else in the log changes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from engine.client.api import AdminApi, SiteApi
from engine.client.transport import AsgiTransport
from engine.errors import AuthError, RemoteError
from engine.server.http import Limits
from engine.server.service import FedServer, ServerSettings
from tests.federation.support import EXECUTOR, Federation, make_federation, wait_until

MODEL = {"w": [0.0, 1.0], "b": 0.5}


@pytest.fixture
def fed(tmp_path: Path) -> Federation:
    return make_federation(tmp_path)


@pytest.fixture
def server(tmp_path: Path, fed: Federation) -> FedServer:
    return FedServer(tmp_path / "server.db", fed.server_dir,
                     settings=ServerSettings(limits=Limits(max_json_bytes=4096)))


@pytest.fixture
def base(server: FedServer, fed: Federation) -> Iterator[AsgiTransport]:
    with AsgiTransport(server.app, fed.token("admin")) as transport:
        yield transport


def site_api(base: AsgiTransport, fed: Federation, site: str, token_of: str | None = None) -> SiteApi:
    return SiteApi(base.with_token(fed.token(token_of or site)), site)


def snapshot(server: FedServer) -> dict[str, tuple[str, int]]:
    """Every machine's (state, version) except the audit trail."""
    return {row.machine_id: (row.state, row.version) for row in server.recorder.machines() if row.kind != "audit"}


def audit_events(server: FedServer) -> list[dict[str, Any]]:
    return [e.data or {} for e in server.recorder.read(machine_id="audit") if e.trigger == "refused"]


def start_job(base: AsgiTransport, fed: Federation) -> dict[str, SiteApi]:
    apis = {s: site_api(base, fed, s) for s in ("site-1", "site-2", "site-3")}
    for api in apis.values():
        api.heartbeat()
    admin = AdminApi(base)
    job = admin.submit_job({"workflow": "fedavg", "executor": EXECUTOR, "min_sites": 3,
                            "args": {"model": MODEL, "rounds": 1}})
    # the job is stable (nothing moves until a site acts) once its first task stands
    wait_until(lambda: admin.show_job(job["job_id"])["current_task"] is not None)
    return apis


def take(api: SiteApi) -> dict[str, Any]:
    for _ in range(50):
        answer = api.poll(1.0)
        if answer["assignment"] is not None:
            return answer
    raise AssertionError(f"{api.site} got no work")


def test_a_site_cannot_poll_as_another_site(server: FedServer, base: AsgiTransport, fed: Federation) -> None:
    start_job(base, fed)
    before = snapshot(server)
    impostor = site_api(base, fed, "site-2", token_of="site-1")
    with pytest.raises(AuthError) as err:
        impostor.poll(0)
    assert err.value.status == 403
    assert "site 'site-1' may not act for 'site-2'" in str(err.value)
    assert snapshot(server) == before
    assert [(a["kind"], a["identity"]) for a in audit_events(server)] == [("forbidden", "site-1")]


def test_a_site_cannot_submit_or_read_another_sites_assignment(server: FedServer, base: AsgiTransport,
                                                                fed: Federation) -> None:
    apis = start_job(base, fed)
    theirs = take(apis["site-2"])["assignment"]
    answer = apis["site-1"].submit(theirs["task_id"], theirs["client_task_id"], {"model": MODEL, "n": 1})
    assert answer == {"outcome": "wrong_site", "counted": False}
    with pytest.raises(RemoteError) as err:
        apis["site-1"].check(theirs["client_task_id"])
    assert err.value.status == 404
    share = server.recorder.get_machine(theirs["client_task_id"])
    assert share is not None and share.state == "sent"  # untouched by the other site's attempt
    drops = [e.data for e in server.recorder.read(machine_id=theirs["task_id"]) if e.trigger == "drop_result"]
    assert drops and drops[0]["reason"] == "wrong_site" and drops[0]["site"] == "site-1"


def test_sites_cannot_call_admin_routes(server: FedServer, base: AsgiTransport, fed: Federation) -> None:
    site_admin = AdminApi(base.with_token(fed.token("site-1")))
    before = snapshot(server)
    for call in (site_admin.list_jobs, lambda: site_admin.submit_job({"workflow": "fedavg"}), site_admin.sites):
        with pytest.raises(AuthError) as err:
            call()
        assert err.value.status == 403
    assert snapshot(server) == before
    assert len(audit_events(server)) == 3


@pytest.mark.parametrize("token", [None, "fl1.site-1.wrong-secret", "garbage"])
def test_missing_or_wrong_credentials_are_401_and_audited(server: FedServer, base: AsgiTransport,
                                                          token: str | None) -> None:
    api = SiteApi(base.with_token(token), "site-1")
    before = snapshot(server)
    with pytest.raises(AuthError) as err:
        api.poll(0)
    assert err.value.status == 401
    assert snapshot(server) == before
    events = audit_events(server)
    assert [e["kind"] for e in events] == ["unauthenticated"]


def test_oversized_and_malformed_bodies_change_nothing(server: FedServer, base: AsgiTransport,
                                                       fed: Federation) -> None:
    apis = start_job(base, fed)
    mine = take(apis["site-1"])["assignment"]
    before = snapshot(server)
    with pytest.raises(RemoteError) as err:
        apis["site-1"].submit(mine["task_id"], mine["client_task_id"], {"blob": "x" * 10_000})
    assert err.value.status == 413
    raw = b'{"task_id": "%s", "result": NaN}' % mine["task_id"].encode()
    with pytest.raises(RemoteError) as err:
        apis["site-1"].transport.request(
            "POST", f"/v1/sites/site-1/assignments/{quote(mine['client_task_id'], safe='')}/result", body=raw,
            headers={"Content-Type": "application/json"})
    assert err.value.status == 400 and err.value.code == "malformed_json"
    assert snapshot(server) == before


def test_bad_job_specs_are_refused_naming_the_field(server: FedServer, base: AsgiTransport) -> None:
    admin = AdminApi(base)
    cases = [
        ({"executor": EXECUTOR}, "workflow"),
        ({"workflow": "no_such_workflow", "executor": EXECUTOR}, "workflow"),
        ({"workflow": "fedavg", "executor": "nocolon"}, "executor"),
        ({"workflow": "fedavg", "executor": EXECUTOR, "min_sites": 9}, "min_sites"),
        ({"workflow": "fedavg", "executor": EXECUTOR, "required_sites": ["site-9"]}, "required_sites"),
        ({"workflow": "fedavg", "executor": EXECUTOR, "deploy_timeout": -1}, "deploy_timeout"),
        ({"workflow": "fedavg", "executor": EXECUTOR, "colour": "blue"}, "colour"),
    ]
    for spec, field in cases:
        with pytest.raises(RemoteError) as err:
            admin.submit_job(spec)
        assert err.value.status == 422 and err.value.details["field"] == field, (spec, err.value)
    assert server.recorder.machines(kind="job") == []


def test_openapi_publishes_the_federation_routes(base: AsgiTransport) -> None:
    doc = base.request("GET", "/openapi.json").json()
    paths = set(doc["paths"])
    for path in ("/v1/sites/{site}/poll", "/v1/sites/{site}/assignments/{client_task_id}/result",
                 "/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/abort"):
        assert path in paths, sorted(paths)
