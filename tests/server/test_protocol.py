"""The HTTP contract, run once in-process (AsgiTransport) and once over uvicorn (HttpTransport).

Every error status has its JSON body checked, and every rejected request is shown
to have reached no handler (the sample app counts handler calls).
"""

from __future__ import annotations

import hashlib
import logging
import os

import orjson
import pytest

from engine.client.errors import AuthError, RemoteError
from engine.server.http import App
from tests.server.support import SMALL_LIMITS, Connect, Federation, SampleState


def error_of(excinfo: pytest.ExceptionInfo[RemoteError]) -> RemoteError:
    exc = excinfo.value
    assert exc.headers["content-type"] == "application/json"
    return exc


# --- routing -------------------------------------------------------------------------


def test_public_and_authenticated_routes(connect: Connect) -> None:
    assert connect(None).request("GET", "/v1/health").json() == {"status": "ok", "version": "1"}
    assert connect("site-1").request("GET", "/v1/whoami").json() == {"name": "site-1", "role": "site"}
    assert connect("admin").request("GET", "/v1/whoami").json() == {"name": "admin", "role": "admin"}


def test_literal_segment_beats_placeholder(connect: Connect) -> None:
    client = connect(None)
    assert client.request("GET", "/v1/items/special").json() == {"special": True}
    assert client.request("GET", "/v1/items/other").json() == {"item": "other"}


def test_encoded_slash_stays_inside_a_parameter(connect: Connect) -> None:
    client = connect(None)
    assert client.request("GET", "/v1/items/a%2Fb").json() == {"item": "a/b"}
    assert client.request("GET", "/v1/items/caf%C3%A9").json() == {"item": "café"}
    with pytest.raises(RemoteError) as err:
        client.request("GET", "/v1/items/a/b")
    assert err.value.status == 404


def test_unknown_route_is_404(connect: Connect) -> None:
    with pytest.raises(RemoteError) as err:
        connect("site-1").request("GET", "/v1/nowhere")
    exc = error_of(err)
    assert (exc.status, exc.code) == (404, "not_found")
    assert "/v1/nowhere" in exc.message
    with pytest.raises(RemoteError) as err:
        connect("site-1").request("GET", "/v1/whoami/")  # no trailing-slash guessing
    assert err.value.status == 404


def test_wrong_method_is_405_with_allow(connect: Connect, sample: tuple[App, SampleState]) -> None:
    with pytest.raises(RemoteError) as err:
        connect("site-1").request("DELETE", "/v1/blobs/x")
    exc = error_of(err)
    assert (exc.status, exc.code) == (405, "method_not_allowed")
    assert exc.headers["allow"] == "GET, PUT"
    assert exc.details["allowed"] == ["GET", "PUT"]
    assert not sample[1].handled


# --- bodies ----------------------------------------------------------------------------


def test_json_route_round_trip(connect: Connect, sample: tuple[App, SampleState]) -> None:
    doc = {"name": "ünïcode ✓", "rounds": 3, "tags": ["a", "b"]}
    assert connect("site-2").request("POST", "/v1/echo", json=doc).json() == {"you": "site-2", "got": doc}
    assert sample[1].handled["echo"] == 1


@pytest.mark.parametrize("raw", [b"{", b'{"name": }', b"\xff\xfe", b""])
def test_malformed_json_is_400(connect: Connect, sample: tuple[App, SampleState], raw: bytes) -> None:
    with pytest.raises(RemoteError) as err:
        connect("site-1").request("POST", "/v1/echo", body=raw,
                                  headers={"Content-Type": "application/json"})
    exc = error_of(err)
    assert (exc.status, exc.code) == (400, "malformed_json")
    assert not sample[1].handled


@pytest.mark.parametrize(("path", "method", "content_type"), [
    ("/v1/echo", "POST", "text/plain"),
    ("/v1/echo", "POST", "application/json; charset=latin-1"),
    ("/v1/echo", "POST", "application/octet-stream"),
    ("/v1/blobs/a", "PUT", "application/json"),
])
def test_wrong_content_type_is_415(connect: Connect, sample: tuple[App, SampleState], path: str,
                                   method: str, content_type: str) -> None:
    with pytest.raises(RemoteError) as err:
        connect("site-1").request(method, path, body=b'{"name": "x"}', headers={"Content-Type": content_type})
    exc = error_of(err)
    assert (exc.status, exc.code) == (415, "unsupported_media_type")
    assert content_type in exc.message
    assert not sample[1].handled


def test_charset_utf8_is_accepted(connect: Connect) -> None:
    resp = connect("site-1").request("POST", "/v1/echo", body=b'{"name": "x"}',
                                     headers={"Content-Type": "application/json; charset=UTF-8"})
    assert resp.json()["got"] == {"name": "x"}


def test_invalid_fields_are_422_listing_every_problem(connect: Connect,
                                                      sample: tuple[App, SampleState]) -> None:
    bad = {"rounds": 0, "tags": ["ok", 7], "colour": "red"}
    with pytest.raises(RemoteError) as err:
        connect("site-1").request("POST", "/v1/echo", json=bad)
    exc = error_of(err)
    assert (exc.status, exc.code) == (422, "invalid_fields")
    assert {(f["path"], f["message"]) for f in exc.details["fields"]} == {
        ("$.name", "is required"),
        ("$.rounds", "must be >= 1"),
        ("$.tags[1]", "expected string, got integer"),
        ("$.colour", "is not an allowed field"),
    }
    with pytest.raises(RemoteError) as err:
        connect("site-1").request("POST", "/v1/echo", json=["not", "an", "object"])
    assert err.value.details["fields"] == [{"path": "$", "message": "expected object, got array"}]
    assert not sample[1].handled


def test_query_parameters_are_typed_and_checked(connect: Connect) -> None:
    client = connect("site-1")
    assert client.request("GET", "/v1/poll", query={"site": "s", "wait": 30, "verbose": True}).json() == {
        "site": "s", "wait": 30, "verbose": True}
    assert client.request("GET", "/v1/poll?site=s").json() == {"site": "s", "wait": 0, "verbose": False}
    with pytest.raises(RemoteError) as err:
        client.request("GET", "/v1/poll?wait=soon&verbose=maybe&colour=red")
    exc = error_of(err)
    assert exc.status == 422
    assert {f["path"] for f in exc.details["fields"]} == {
        "query.wait", "query.verbose", "query.colour", "query.site"}
    with pytest.raises(RemoteError) as err:
        client.request("GET", "/v1/poll?site=s&wait=61")
    assert err.value.details["fields"] == [{"path": "query.wait", "message": "must be <= 60"}]
    with pytest.raises(RemoteError) as err:
        client.request("GET", "/v1/poll?site=a&site=b")
    assert err.value.details["fields"][0]["message"] == "is given more than once"


def _json_of_size(size: int) -> bytes:
    """A valid echo document of exactly ``size`` bytes."""
    base = orjson.dumps({"name": ""})
    doc = orjson.dumps({"name": "x" * (size - len(base))})
    assert len(doc) == size
    return doc


def test_json_body_limit(connect: Connect, sample: tuple[App, SampleState]) -> None:
    limit = SMALL_LIMITS.max_json_bytes
    client = connect("site-1")
    headers = {"Content-Type": "application/json"}
    resp = client.request("POST", "/v1/echo", body=_json_of_size(limit), headers=headers)
    assert len(resp.json()["got"]["name"]) == limit - len(b'{"name":""}')
    with pytest.raises(RemoteError) as err:
        client.request("POST", "/v1/echo", body=_json_of_size(limit + 1), headers=headers)
    exc = error_of(err)
    assert (exc.status, exc.code) == (413, "payload_too_large")
    assert exc.details["limit"] == limit
    assert sample[1].handled["echo"] == 1


def test_octet_body_limit(connect: Connect, sample: tuple[App, SampleState]) -> None:
    limit = SMALL_LIMITS.max_octet_bytes
    client = connect("site-1")
    data = os.urandom(limit + 1)
    got = client.request("PUT", "/v1/blobs/full", body=data[:limit]).json()
    assert got == {"name": "full", "size": limit, "sha256": hashlib.sha256(data[:limit]).hexdigest()}
    with pytest.raises(RemoteError) as err:
        client.request("PUT", "/v1/blobs/over", body=data)
    exc = error_of(err)
    assert (exc.status, exc.code) == (413, "payload_too_large")
    assert sample[1].handled["put_blob"] == 1
    assert "over" not in sample[1].blobs
    # the connection (if any) is still usable after a refused body
    assert client.request("GET", "/v1/blobs/full").body == data[:limit]


def test_octet_round_trip_and_404(connect: Connect) -> None:
    client = connect("site-2")
    data = bytes(range(256)) * 20
    assert client.request("PUT", "/v1/blobs/b1", body=data).status == 201
    resp = client.request("GET", "/v1/blobs/b1")
    assert resp.body == data
    assert resp.headers["content-type"] == "application/octet-stream"
    with pytest.raises(RemoteError) as err:
        client.request("GET", "/v1/blobs/missing")
    assert (err.value.status, err.value.code, err.value.details) == (404, "no_such_blob", {"name": "missing"})


def test_streamed_body_arrives_whole(connect: Connect, sample: tuple[App, SampleState]) -> None:
    data = os.urandom(SMALL_LIMITS.max_octet_bytes)
    assert connect("site-1").request("POST", "/v1/blobs/s/stream", body=data).json()["size"] == len(data)
    assert sum(sample[1].streamed) == len(data)


# --- headers ---------------------------------------------------------------------------


def test_too_many_headers_is_431(connect: Connect, sample: tuple[App, SampleState]) -> None:
    extra = {f"X-Extra-{i}": "1" for i in range(SMALL_LIMITS.max_header_count)}
    with pytest.raises(RemoteError) as err:
        connect("site-1").request("GET", "/v1/whoami", headers=extra)
    exc = error_of(err)
    assert (exc.status, exc.code) == (431, "headers_too_large")
    assert exc.details["limit"] == SMALL_LIMITS.max_header_count


def test_oversized_headers_are_431(connect: Connect) -> None:
    with pytest.raises(RemoteError) as err:
        connect("site-1").request("GET", "/v1/whoami", headers={"X-Big": "y" * SMALL_LIMITS.max_header_bytes})
    exc = error_of(err)
    assert (exc.status, exc.code) == (431, "headers_too_large")
    assert exc.details["limit"] == SMALL_LIMITS.max_header_bytes


def test_headers_just_under_the_limits_pass(connect: Connect) -> None:
    client = connect("site-1")
    # the transport adds its own headers; stay clear of the count limit with room for them
    extra = {f"X-Extra-{i}": "1" for i in range(SMALL_LIMITS.max_header_count - 10)}
    assert client.request("GET", "/v1/whoami", headers=extra).json()["name"] == "site-1"


# --- identity and access ---------------------------------------------------------------


def test_missing_credential_is_401(connect: Connect, sample: tuple[App, SampleState]) -> None:
    with pytest.raises(AuthError) as err:
        connect(None).request("GET", "/v1/whoami")
    exc = error_of(err)
    assert (exc.status, exc.code) == (401, "unauthenticated")
    assert "Authorization: Bearer" in exc.message
    assert exc.headers["www-authenticate"] == 'Bearer realm="fedlog"'
    assert [(a.kind, a.route, a.identity) for a in sample[1].audit] == [
        ("unauthenticated", "/v1/whoami", None)]


def test_wrong_scheme_is_401(connect: Connect, sample: tuple[App, SampleState],
                             federation: Federation) -> None:
    with pytest.raises(AuthError) as err:
        connect(None).request("GET", "/v1/whoami",
                              headers={"Authorization": f"Basic {federation.tokens['site-1']}"})
    exc = error_of(err)
    assert exc.status == 401
    assert "'Basic'" in exc.message
    assert exc.headers["www-authenticate"] == 'Bearer realm="fedlog", error="invalid_request"'
    assert len(sample[1].audit) == 1


def test_wrong_tokens_are_401_and_indistinguishable(connect: Connect, sample: tuple[App, SampleState],
                                                    federation: Federation) -> None:
    real = federation.tokens["site-1"]
    forged_secret = real[:-4] + ("AAAA" if not real.endswith("AAAA") else "BBBB")
    unknown_name = real.replace("site-1", "site-9")
    answers = []
    for token in (forged_secret, unknown_name, "garbage", real + "x"):
        with pytest.raises(AuthError) as err:
            connect(token).request("POST", "/v1/echo", json={"name": "x"})
        exc = error_of(err)
        assert exc.status == 401
        assert exc.headers["www-authenticate"] == 'Bearer realm="fedlog", error="invalid_token"'
        answers.append((exc.code, exc.message, exc.details))
    assert len(set(map(repr, answers))) == 1, answers
    assert [a.identity for a in sample[1].audit] == ["site-1", "site-9", None, "site-1"]
    assert all(a.kind == "unauthenticated" and a.method == "POST" for a in sample[1].audit)
    assert not sample[1].handled


def test_site_calling_admin_route_is_403(connect: Connect, sample: tuple[App, SampleState]) -> None:
    with pytest.raises(AuthError) as err:
        connect("site-1").request("GET", "/v1/admin/stats")
    exc = error_of(err)
    assert (exc.status, exc.code) == (403, "forbidden")
    assert "'site'" in exc.message and "GET /v1/admin/stats" in exc.message and "admin" in exc.message
    assert [(a.kind, a.identity, a.role) for a in sample[1].audit] == [("forbidden", "site-1", "site")]
    assert not sample[1].handled
    assert connect("admin").request("GET", "/v1/admin/stats").json() == {"handled": {"admin_stats": 1}}


def test_a_site_may_act_only_for_itself(connect: Connect, sample: tuple[App, SampleState]) -> None:
    assert connect("site-1").request("GET", "/v1/sites/site-1/inbox").json() == {"site": "site-1"}
    assert connect("admin").request("GET", "/v1/sites/site-2/inbox").json() == {"site": "site-2"}
    with pytest.raises(AuthError) as err:
        connect("site-1").request("GET", "/v1/sites/site-2/inbox")
    exc = error_of(err)
    assert exc.status == 403
    assert "'site-1'" in exc.message and "'site-2'" in exc.message
    assert sample[1].handled["inbox"] == 2
    assert [a.kind for a in sample[1].audit] == ["forbidden"]


def test_failing_audit_hook_changes_nothing(connect: Connect, sample: tuple[App, SampleState],
                                            caplog: pytest.LogCaptureFixture) -> None:
    app, state = sample

    def broken(event: object) -> None:
        raise OSError("audit disk full")

    app._audit = broken
    with pytest.raises(AuthError) as err:
        connect(None).request("GET", "/v1/whoami")
    assert err.value.status == 401
    assert "the audit hook failed" in caplog.text


# --- failures --------------------------------------------------------------------------


def test_unexpected_failure_is_500_without_internals(connect: Connect, sample: tuple[App, SampleState],
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="engine.server.http")
    with pytest.raises(RemoteError) as err:
        connect("site-1").request("GET", "/v1/boom")
    exc = error_of(err)
    assert (exc.status, exc.code) == (500, "internal_error")
    incident = exc.details["incident"]
    assert incident in exc.message
    assert "hunter2" not in exc.message and "RuntimeError" not in exc.message
    logged = [r for r in caplog.records if incident in r.getMessage()]
    assert logged and logged[0].exc_info is not None
    assert "hunter2" in str(logged[0].exc_info[1])
    # the server keeps serving
    assert connect("site-1").request("GET", "/v1/whoami").status == 200


def test_engine_errors_are_mapped(connect: Connect) -> None:
    with pytest.raises(RemoteError) as err:
        connect("admin").request("POST", "/v1/machines/m-42/fire")
    exc = error_of(err)
    assert (exc.status, exc.code, exc.details) == (404, "unknown_machine", {"machine_id": "m-42"})


def test_openapi_document_is_served(connect: Connect, sample: tuple[App, SampleState]) -> None:
    doc = connect(None).request("GET", "/openapi.json").json()
    assert doc["openapi"] == "3.1.0"
    assert doc["info"] == {"title": "sample", "version": "1"}
    published = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert published == {(r.method, r.template) for r in sample[0].router.routes}
