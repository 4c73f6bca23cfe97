"""The OpenAPI 3.1 document: complete, consistent with the routes, structurally valid."""

from __future__ import annotations

import re
from typing import Any

import orjson

from engine.server.http import App
from engine.server.openapi import openapi_document
from engine.server.schema import check_schema
from tests.server.support import SampleState

HTTP_METHODS = {"get", "put", "post", "delete", "patch"}


def resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        node = node[part]
    return node


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if "$ref" in node else []
        return found + [r for v in node.values() for r in refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in refs(v)]
    return []


def test_document_describes_every_route(sample: tuple[App, SampleState]) -> None:
    app = sample[0]
    doc = orjson.loads(orjson.dumps(openapi_document(app.router, title="t", version="9")))
    assert doc["openapi"] == "3.1.0" and doc["info"] == {"title": "t", "version": "9"}
    assert set(doc) == {"openapi", "info", "paths", "components"}
    ops = {(m.upper(), path): op for path, item in doc["paths"].items() for m, op in item.items()}
    assert set(ops) == {(r.method, r.template) for r in app.router.routes}
    assert len({op["operationId"] for op in ops.values()}) == len(ops)
    for ref in refs(doc):
        assert resolve(doc, ref) is not None


def test_operations_match_their_routes(sample: tuple[App, SampleState]) -> None:
    doc = openapi_document(sample[0].router, title="t", version="1")
    for route in sample[0].router.routes:
        op = doc["paths"][route.template][route.method.lower()]
        assert set(doc["paths"][route.template]) <= HTTP_METHODS
        assert op["summary"] == route.summary
        params = op.get("parameters", [])
        assert [p["name"] for p in params if p["in"] == "path"] == re.findall(r"\{(\w+)\}", route.template)
        assert all(p["required"] for p in params if p["in"] == "path")
        assert [p["name"] for p in params if p["in"] == "query"] == [q.name for q in route.query]
        codes = set(op["responses"])
        assert str(route.status) in codes and {"431", "500"} <= codes
        for response in op["responses"].values():
            assert response["description"]
        if route.roles is None:
            assert op["security"] == [] and op["x-roles"] == []
        else:
            assert op["security"] == [{"bearer": []}]
            assert op["x-roles"] == sorted(route.roles)
            assert {"401", "403"} <= codes
            assert "Allowed roles: " in op["description"]
        body = op.get("requestBody")
        if route.body == "none":
            assert body is None
        else:
            media = "application/json" if route.body == "json" else "application/octet-stream"
            assert list(body["content"]) == [media]
            assert {"400", "413", "415"} <= codes
        if route.body == "json" and route.request_schema is not None:
            assert body["content"]["application/json"]["schema"] == route.request_schema
            check_schema(body["content"]["application/json"]["schema"])
        ok = op["responses"][str(route.status)]
        if route.response_type == "application/json":
            check_schema(ok["content"]["application/json"]["schema"])
        for code in route.errors:
            assert str(code) in codes


def test_specific_routes(sample: tuple[App, SampleState]) -> None:
    doc = openapi_document(sample[0].router, title="t", version="1")
    echo = doc["paths"]["/v1/echo"]["post"]
    assert "422" in echo["responses"]
    assert echo["responses"]["200"]["content"]["application/json"]["schema"]["required"] == ["you", "got"]
    blob = doc["paths"]["/v1/blobs/{name}"]["get"]
    assert list(blob["responses"]["200"]["content"]) == ["application/octet-stream"]
    assert blob["responses"]["404"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Error"}
    poll = doc["paths"]["/v1/poll"]["get"]["parameters"]
    assert poll[0] == {"name": "wait", "in": "query", "required": False,
                       "schema": {"type": "integer", "minimum": 0, "maximum": 60, "default": 0}}
    assert doc["paths"]["/v1/admin/stats"]["get"]["x-roles"] == ["admin"]
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
