"""Router: template rules, registration checks and which route a path means."""

from __future__ import annotations

import pytest

from engine.errors import ConfigError
from engine.server.http import Request, Response, json_response
from engine.server.routing import QueryParam, Route, Router


async def handler(request: Request) -> Response:
    return json_response({})


def route(method: str, template: str, **spec: object) -> Route:
    return Route(method, template, handler, "summary", roles=None, **spec)  # type: ignore[arg-type]


def test_match_literal_placeholder_and_method() -> None:
    router = Router([route("GET", "/v1/tasks/{task_id}"), route("GET", "/v1/tasks/next"),
                     route("POST", "/v1/tasks/{task_id}/result"), route("PUT", "/v1/tasks/{task_id}"),
                     route("GET", "/")])
    hit = router.match("GET", "/v1/tasks/t1")
    assert hit.route is not None and hit.route.template == "/v1/tasks/{task_id}"
    assert hit.params == {"task_id": "t1"}
    assert hit.allowed == ("GET", "PUT")
    nxt = router.match("GET", "/v1/tasks/next")
    assert nxt.route is not None and nxt.route.template == "/v1/tasks/next" and nxt.params == {}
    # PUT has only the placeholder route at this path, and it still matches
    put = router.match("PUT", "/v1/tasks/next")
    assert put.route is not None and put.params == {"task_id": "next"}
    miss = router.match("DELETE", "/v1/tasks/t1")
    assert miss.route is None and miss.allowed == ("GET", "PUT")
    assert router.match("GET", "/v1/tasks").allowed == ()
    assert router.match("GET", "/v1/tasks/").route is None  # an empty segment is no value
    root = router.match("GET", "/")
    assert root.route is not None and root.route.template == "/"


def test_most_specific_route_wins_position_by_position() -> None:
    router = Router([route("GET", "/a/{x}/c"), route("GET", "/{y}/b/c")])
    hit = router.match("GET", "/a/b/c")
    assert hit.route is not None and hit.route.template == "/a/{x}/c"


def test_parameters_are_decoded_after_splitting() -> None:
    router = Router([route("GET", "/files/{name}")])
    assert router.match("GET", "/files/a%2Fb%20c").params == {"name": "a/b c"}
    assert router.match("GET", "/files/a/b").route is None


@pytest.mark.parametrize(("template", "message"), [
    ("v1/x", "must start with '/'"),
    ("/v1/{a}/{a}", "repeats"),
    ("/v1/{a-b}", "bad segment"),
    ("/v1//x", "bad segment"),
    ("/v1/x y", "bad segment"),
])
def test_bad_templates(template: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Router([route("GET", template)])


def test_registration_checks() -> None:
    router = Router([route("GET", "/v1/tasks/{task_id}")])
    with pytest.raises(ConfigError, match="clashes"):
        router.add(route("get", "/v1/tasks/{other}"))
    with pytest.raises(ConfigError, match="unsupported method"):
        router.add(route("TRACE", "/v1/x"))
    with pytest.raises(ConfigError, match="body='json'"):
        router.add(route("POST", "/v1/y", request_schema={"type": "object"}))
    with pytest.raises(ConfigError, match="unsupported keyword"):
        router.add(route("POST", "/v1/z", body="json", request_schema={"type": "object", "oneOf": []}))
    with pytest.raises(ConfigError, match="both path and query"):
        router.add(route("GET", "/v1/q/{site}", query=(QueryParam("site"),)))
    with pytest.raises(ConfigError, match="operation id"):
        router.add(route("POST", "/v1/w", operation_id="get_v1_tasks_task_id"))
    assert [r.template for r in router.routes] == ["/v1/tasks/{task_id}"]


def test_methods_are_normalised_and_operation_ids_derived() -> None:
    router = Router()
    added = router.add(route("post", "/v1/jobs/{job_id}/abort"))
    assert added.method == "POST"
    assert added.operation_id == "post_v1_jobs_job_id_abort"
    assert added.param_names == ("job_id",)


def test_decorator_and_include() -> None:
    inner = Router()

    @inner.route("GET", "/v1/ping", summary="ping", roles=None, tags=("meta",))
    async def ping(request: Request) -> Response:
        return json_response({"pong": True})

    outer = Router()
    outer.include(inner)
    hit = outer.match("GET", "/v1/ping")
    assert hit.route is not None and hit.route.handler is ping and hit.route.tags == ("meta",)
