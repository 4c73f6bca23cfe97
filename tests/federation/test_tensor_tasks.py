"""Tasks carry tensors: models and updates travel as manifests + chunks over the chunk routes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.chunks import hash_bytes
from engine.client.api import AdminApi, SiteApi
from engine.client.transport import AsgiTransport
from engine.errors import AuthError, RemoteError
from engine.server.service import FedServer
from engine.tensors import load, pack, ref
from tests.federation.support import SITES, Federation, agents_running, make_federation, wait_until


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


def cnn_job(rounds: int = 2) -> dict[str, Any]:
    return {"workflow": "fedavg_torch", "executor": "engine.jobs.cnn:train", "min_sites": 3,
            "args": {"model": "engine.jobs.cnn:initial_state", "rounds": rounds, "epochs": 1}}


def test_fedavg_on_torch_through_the_http_api(tmp_path: Path, server: FedServer, base: AsgiTransport,
                                             fed: Federation) -> None:
    admin = AdminApi(base)
    apis = {s: SiteApi(base.with_token(fed.token(s)), s) for s in SITES}
    with agents_running(apis, tmp_path) as agents:
        job = admin.submit_job(cnn_job())["job_id"]
        wait_until(lambda: admin.show_job(job)["state"] in ("finished", "failed"), timeout=120)
        downloaded = {s: a.payloads.bytes_in for s, a in agents.items()}
    done = admin.show_job(job)
    assert done["state"] == "finished", done
    result = admin.job_result(job)["result"]
    digest = result["model_hash"]
    assert result["model"] == ref(digest) and server.chunks.missing([digest]) == []
    # each site downloaded each round's model once (2 rounds): manifest plus chunks, never more
    final = load(server.chunks, digest)
    per_model = pack(final).manifest.nbytes + len(server.chunks.get(digest))
    assert all(per_model < b <= 2 * per_model + 1024 for b in downloaded.values()), (downloaded, per_model)


def test_chunk_routes_check_every_byte_and_grant(server: FedServer, base: AsgiTransport, fed: Federation) -> None:
    site = SiteApi(base.with_token(fed.token("site-1")), "site-1")
    data = b"some tensor bytes" * 100
    digest = hash_bytes(data)
    assert site.missing_chunks([digest]) == [digest]
    with pytest.raises(RemoteError) as err:
        site.put_chunk(digest, data + b"!")
    assert err.value.status == 422 and err.value.code == "chunk_integrity"
    assert server.chunks.missing([digest]) == [digest]  # nothing stored
    for bad in ("XYZ", digest.upper(), digest[:-2]):
        with pytest.raises(RemoteError) as err:
            site.put_chunk(bad, data)
        assert err.value.status == 422 and err.value.code == "invalid_digest"
    site.put_chunk(digest, data)
    assert site.missing_chunks([digest]) == []
    with pytest.raises(AuthError) as denied:  # never given a manifest naming it
        site.get_chunk(digest)
    assert denied.value.status == 403 and "never given a manifest" in str(denied.value)
    assert AdminApi(base).transport.request("GET", f"/v1/chunks/{digest}").body == data


def test_a_result_naming_chunks_that_were_not_uploaded_is_refused(server: FedServer, base: AsgiTransport,
                                                                 fed: Federation) -> None:
    for s in SITES:
        SiteApi(base.with_token(fed.token(s)), s).heartbeat()
    admin = AdminApi(base)
    job = admin.submit_job(cnn_job(1))["job_id"]
    wait_until(lambda: admin.show_job(job)["current_task"])
    site = SiteApi(base.with_token(fed.token("site-1")), "site-1")
    a = site.poll(1)["assignment"]
    packed = pack({"w": torch.randn(64)}, chunk_size=64)
    manifest = packed.manifest.to_bytes()
    with pytest.raises(RemoteError) as err:
        site.submit(a["task_id"], a["client_task_id"], {"model": ref(packed.digest), "n": 1})
    assert err.value.code == "missing_manifest"
    site.put_chunk(packed.digest, manifest)
    with pytest.raises(RemoteError) as err:
        site.submit(a["task_id"], a["client_task_id"], {"model": ref(packed.digest), "n": 1})
    assert err.value.code == "missing_chunks" and len(err.value.details["missing"]) == 4
    share = server.recorder.get_machine(a["client_task_id"])
    assert share is not None and share.state == "sent"  # nothing recorded
    # a manifest that lies about its sizes
    lie = packed.manifest.as_json()
    lie["tensors"][0]["nbytes"] = 10
    import orjson

    raw = orjson.dumps(lie, option=orjson.OPT_SORT_KEYS)
    site.put_chunk(hash_bytes(raw), raw)
    with pytest.raises(RemoteError) as err:
        site.submit(a["task_id"], a["client_task_id"], {"model": ref(hash_bytes(raw)), "n": 1})
    assert err.value.code == "invalid_manifest" and "nbytes" in err.value.message
