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
    assert site.get_chunk(digest) == data  # its uploader holds it: reading it back discloses nothing
    other = SiteApi(base.with_token(fed.token("site-2")), "site-2")
    with pytest.raises(AuthError) as denied:  # never given a manifest naming it
        other.get_chunk(digest)
    assert denied.value.status == 403 and "never given a manifest" in str(denied.value)
    with pytest.raises(RemoteError) as err:  # a repeat upload proves possession only with the right bytes
        other.put_chunk(digest, data + b"!")
    assert err.value.status == 422 and err.value.code == "chunk_integrity"
    with pytest.raises(AuthError):
        other.get_chunk(digest)
    assert AdminApi(base).transport.request("GET", f"/v1/chunks/{digest}").body == data


def test_batched_chunk_routes_check_every_byte_and_grant(server: FedServer, base: AsgiTransport,
                                                       fed: Federation, monkeypatch: pytest.MonkeyPatch) -> None:
    site = SiteApi(base.with_token(fed.token("site-1")), "site-1")
    datas = [bytes([i]) * (1000 + i) for i in range(5)]
    digests = [hash_bytes(d) for d in datas]
    # one bad chunk in a batch: 422 naming it, and none of the batch is stored
    with pytest.raises(RemoteError) as err:
        site.put_chunks([*zip(digests[:2], datas[:2], strict=True), (digests[2], datas[2] + b"!")])
    assert err.value.status == 422 and err.value.code == "chunk_integrity" and err.value.details["digest"] == digests[2]
    assert server.chunks.missing(digests) == digests
    transport = site.transport
    header = f"{digests[0]}:{len(datas[0])}"
    bad_lists = {  # the header that names the chunks must add up, parse and stay within the limits
        f"{digests[0]}:{len(datas[0]) + 1}": "invalid_chunk_list",
        f"{digests[0]}:x": "invalid_chunk_list",
        f"{digests[0][:-1]}:{len(datas[0])}": "invalid_digest",
        ",".join([header] * 65): "invalid_chunk_list",
    }
    for chunk_list, code in bad_lists.items():
        with pytest.raises(RemoteError) as err:
            transport.request("POST", "/v1/chunks/upload", body=datas[0], headers={"Fedlog-Chunks": chunk_list})
        assert err.value.status == 422 and err.value.code == code, chunk_list
    with pytest.raises(RemoteError) as err:
        transport.request("POST", "/v1/chunks/upload", body=datas[0])
    assert err.value.code == "invalid_chunk_list"
    forty = 40 << 20  # two chunks of 40 MiB: each allowed, together over the 64 MiB of one upload
    with pytest.raises(RemoteError) as err:
        transport.request("POST", "/v1/chunks/upload", body=datas[0],
                          headers={"Fedlog-Chunks": f"{digests[0]}:{forty},{digests[1]}:{forty}"})
    assert err.value.status == 413 and err.value.code == "payload_too_large"
    assert server.chunks.missing(digests) == digests
    site.put_chunks(list(zip(digests, datas, strict=True)))
    assert server.chunks.missing(digests) == []
    # the uploader may read them back, several to an answer, in the order asked
    assert [bytes(d) for d in site.get_chunks(digests[::-1])] == datas[::-1]
    # an answer stops before passing its byte cap (at least one chunk); the client asks again for the rest
    monkeypatch.setattr("engine.server.chunk_routes.MAX_BATCH_BYTES", 2100)
    calls = []
    real = transport.request

    def counting(method: str, path: str, **kw: Any) -> Any:
        calls.append(path)
        return real(method, path, **kw)

    monkeypatch.setattr(transport, "request", counting)
    assert [bytes(d) for d in site.get_chunks(digests)] == datas
    assert calls == ["/v1/chunks/fetch"] * 3  # 2 + 2 + 1 chunks of ~1 KB under a 2100-byte cap
    other = SiteApi(base.with_token(fed.token("site-2")), "site-2")
    with pytest.raises(AuthError) as denied:  # never given a manifest naming them
        other.get_chunks(digests)
    assert denied.value.status == 403 and denied.value.details["digest"] == digests[0]
    missing = hash_bytes(b"never uploaded")
    with pytest.raises(RemoteError) as err:
        AdminApi(base).transport.request("POST", "/v1/chunks/fetch", json={"digests": [digests[0], missing]})
    assert err.value.status == 404 and err.value.details["digest"] == missing
    with pytest.raises(RemoteError) as err:
        site.get_chunks(["nope"])
    assert err.value.status == 422 and err.value.code == "invalid_digest"


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


def task_data_rows(server: FedServer, job_id: str) -> list[Any]:
    return [r for r in server.recorder.machines(kind="task_data", job_id=job_id)]


def test_task_data_is_recorded_per_site_and_released_once_every_site_has_it(
        tmp_path: Path, server: FedServer, base: AsgiTransport, fed: Federation) -> None:
    admin = AdminApi(base)
    apis = {s: SiteApi(base.with_token(fed.token(s)), s) for s in SITES}
    with agents_running(apis, tmp_path):
        first = admin.submit_job({**cnn_job(rounds=2), "tensor_stream": {"tensor_send_timeout": 12.5}})["job_id"]
        wait_until(lambda: admin.show_job(first)["state"] in ("finished", "failed"), timeout=120)
        # the same starting model again: every site already holds it, so the first round is skipped
        second = admin.submit_job(cnn_job(rounds=1))["job_id"]
        wait_until(lambda: admin.show_job(second)["state"] in ("finished", "failed"), timeout=120)
    assert admin.show_job(first)["state"] == admin.show_job(second)["state"] == "finished"
    rows = task_data_rows(server, first)
    assert [r.round for r in rows] == [0, 1] or sorted(r.round or 0 for r in rows) == [0, 1]
    for row in rows:
        assert row.state == "released"
        figures = server.tensor_streamer.figures(row.machine_id.removeprefix("td:"))
        assert figures is not None
        assert figures["num_task_data_sent"] == 3 and figures["num_task_skipped"] == 0 and figures["missing"] == []
        assert figures["released_us"] >= figures["start_sending_us"]
    sessions = [r for r in server.recorder.machines(kind="stream_send", job_id=first) if r.machine_id.startswith("tss:")]
    assert len(sessions) == 6 and {r.state for r in sessions} == {"completed"}
    one = sessions[0].machine_id
    trail = [e.trigger for e in server.recorder.read(machine_id=one)]
    assert trail[:4] == ["create", "offer", "want", "start"] and "ack" in trail and trail[-1] == "complete"
    opening = next(iter(server.recorder.read(machine_id=one))).data
    assert isinstance(opening, dict) and opening["entry_timeout"] == 12.5
    (again,) = task_data_rows(server, second)
    figures = server.tensor_streamer.figures(again.machine_id.removeprefix("td:"))
    assert figures is not None and figures["num_task_skipped"] == 3 and figures["num_task_data_sent"] == 0
    assert server.tensor_streamer.cached_bytes == 0  # every copy was released


def test_bad_tensor_stream_settings_are_refused_naming_the_key(server: FedServer, base: AsgiTransport) -> None:
    admin = AdminApi(base)
    for bad, words in (({"format": "numpy"}, "format: 'numpy' is not supported"),
                       ({"tasks": []}, "tasks: must be a non-empty list"),
                       ({"tensor_send_timeout": 0}, "tensor_send_timeout: must be a number of seconds > 0"),
                       ({"chunk": 1}, "chunk: unknown key")):
        with pytest.raises(RemoteError, match=words) as caught:
            admin.submit_job({**cnn_job(), "tensor_stream": bad})
        assert caught.value.status == 422
    assert admin.list_jobs() == []


def test_the_in_memory_copy_is_released_when_the_wait_for_all_sites_times_out(
        tmp_path: Path, server: FedServer, base: AsgiTransport, fed: Federation) -> None:
    from engine.server.tensor_streamer import TensorStreamConfig
    from engine.tensors import store

    model = {"w": torch.arange(4096, dtype=torch.float32)}
    digest = store(pack(model, chunk_size=4096), server.chunks)
    config = TensorStreamConfig(wait_send_task_data_all_clients_timeout=0.2)
    streamer = server.tensor_streamer
    sessions = streamer.on_dispatch(job_id=None, round=0, task_id="t1", task_name="train", client_task_id="ct1",
                                    site="site-1", data={"model": ref(digest)}, targets=["site-1", "site-2"],
                                    config=config)
    assert sessions == [f"tss:ct1:{digest[:16]}"]
    assert streamer.chunk(digest) is not None and streamer.cached_bytes > 0
    streamer.on_report("site-1", sessions[0], "want", {"want": 4, "held": 0})
    streamer.on_report("site-1", sessions[0], "complete", {"bytes": 16384, "chunks": 4, "skipped": 0})
    wait_until(lambda: server.recorder.get_machine("td:t1").state == "incomplete", timeout=10)
    streamer.sweep(force=True)
    assert streamer.cached_bytes == 0 and streamer.chunk(digest) is None
    figures = streamer.figures("t1")
    assert figures is not None and figures["missing"] == ["site-2"] and figures["num_task_data_sent"] == 1
    with pytest.raises(KeyError):
        streamer.on_report("site-2", sessions[0], "ack", {})  # not site-2's session


def test_a_completion_reported_without_the_earlier_steps_still_counts(server: FedServer) -> None:
    from engine.server.tensor_streamer import TensorStreamConfig
    from engine.tensors import store

    digest = store(pack({"w": torch.arange(2048, dtype=torch.float32)}, chunk_size=4096), server.chunks)
    streamer = server.tensor_streamer
    sessions = {}
    for site in ("site-1", "site-2"):
        (sessions[site],) = streamer.on_dispatch(job_id=None, round=0, task_id="t9", task_name="train",
                                                 client_task_id=f"ct-{site}", site=site, data=ref(digest),
                                                 targets=["site-1", "site-2"], config=TensorStreamConfig())
    # site-1 died after downloading, before its want/ack reports went out; on restart it reports completion
    assert streamer.on_report("site-1", sessions["site-1"], "complete",
                              {"bytes": 8192, "chunks": 2, "skipped": 0}) == "completed"
    streamer.on_report("site-2", sessions["site-2"], "want", {"want": 0, "held": 2})
    assert streamer.on_report("site-2", sessions["site-2"], "complete",
                              {"bytes": 0, "chunks": 0, "skipped": 2}) == "completed"
    figures = streamer.figures("t9")
    assert figures is not None and figures["state"] == "released"
    assert figures["num_task_data_sent"] == 1 and figures["num_task_skipped"] == 1
    assert streamer.cached_bytes == 0


def test_a_restarted_server_grants_again_what_recorded_aux_requests_shared(server: FedServer) -> None:
    from engine.server.chunk_routes import ChunkAccess
    from engine.tensors import store

    digest = store(pack({"w": torch.arange(6, dtype=torch.float32)}), server.chunks)
    request = {"round": 1, "model": ref(digest)}
    for target, shared in (("site-2", [digest]), ("site-3", None)):  # site-1 could not read it for site-3's
        data = {"request_id": "r1", "sender": "site-1", "target": target, "topic": "swarm.learn",
                "request": request, "timeout": 5.0, "fire_and_forget": False}
        if shared:
            data["shared"] = shared
        server.runtime.create("aux", machine_id=f"job-x.aux.r1/{target}", data=data, job_id="job-x", site=target,
                              deadline_us=server.clock.now_us() + 5_000_000)
    server.chunk_access = ChunkAccess(server.chunks)  # what a restart leaves: no grants at all
    assert not server.chunk_access.allows("site-2", digest)
    assert server.aux.restore_shares("job-x") == 1
    manifest_chunks = set(load_manifest_chunks(server, digest))
    assert server.chunk_access.allows("site-2", digest)
    assert all(server.chunk_access.allows("site-2", d) for d in manifest_chunks)
    assert server.chunk_access.allows("site-1", digest)  # its sender held it
    assert not server.chunk_access.allows("site-3", digest)  # naming an address is still not holding it


def load_manifest_chunks(server: FedServer, digest: str) -> list[str]:
    from engine.tensors import Manifest

    return Manifest.from_bytes(server.chunks.get(digest)).chunk_digests()


def test_fedavg_reads_each_result_once_as_it_arrives(tmp_path: Path, server: FedServer, base: AsgiTransport,
                                                     fed: Federation, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from engine.workflows import controller

    reads: list[tuple[str, str]] = []
    real_load = controller.tensor_load

    def counting_load(store: Any, digest: str, **kw: Any) -> Any:
        reads.append((digest, threading.current_thread().name))
        return real_load(store, digest, **kw)

    monkeypatch.setattr(controller, "tensor_load", counting_load)
    admin = AdminApi(base)
    apis = {s: SiteApi(base.with_token(fed.token(s)), s) for s in SITES}
    with agents_running(apis, tmp_path):
        job = admin.submit_job(cnn_job())["job_id"]
        wait_until(lambda: admin.show_job(job)["state"] in ("finished", "failed"), timeout=120)
    assert admin.show_job(job)["state"] == "finished"
    results = [e.data["result"]["model"]["$tensors"] for e in server.recorder.read(job_id=job)
               if e.kind == "client_task" and e.trigger == "result"]
    assert len(results) == 2 * len(SITES)
    # every result was read once, on the read-ahead threads, and never again by the aggregation
    assert sorted(d for d, _ in reads) == sorted(results)
    assert all(name.startswith("fedlog-prefetch") for _, name in reads), reads
