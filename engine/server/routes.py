"""The federation's HTTP routes: sites poll, submit and check; admins submit, list, show, abort jobs.

Site routes carry the site's name in the path and the handler insists that the
caller *is* that site (``Request.require_identity``), so a site sees only its own
assignments and can submit only as itself; the task manager then refuses a result
for another site's assignment (``wrong_site``). Every site route counts as a
heartbeat (the task manager records contact). The poll is a long poll: it waits
until the task manager signals new work or ``wait`` seconds pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
from typing import TYPE_CHECKING, Any

from engine import faults
from engine.errors import TaskError, UnknownMachine
from engine.server.auth import ADMIN_ONLY, ANY_ROLE
from engine.server.chunk_routes import require_payloads
from engine.server.http import HttpError, Request, Response, json_response
from engine.server.jobs import UnknownJob
from engine.server.jobspec import JobSpecError
from engine.server.routing import QueryParam, Route, Router
from engine.tasks import TaskAssignment
from engine.tensors import refs_in

if TYPE_CHECKING:
    from engine.server.service import FedServer

__all__ = ["federation_router"]

#: the longest a poll may wait (below the default heartbeat timeout of 60 s)
MAX_POLL_WAIT_S = 30.0

_JSON = {"type": "object"}
_NAME = {"type": "string", "minLength": 1, "maxLength": 200}
ASSIGNMENT_SCHEMA = {
    "type": "object",
    "required": ["task_id", "client_task_id", "name", "data", "props", "resend", "send_count", "job_id"],
    "properties": {
        "task_id": {"type": "string"}, "client_task_id": {"type": "string"}, "name": {"type": "string"},
        "data": {}, "props": _JSON, "resend": {"type": "boolean"}, "send_count": {"type": "integer"},
        "hop": {"type": ["integer", "null"]}, "job_id": {"type": ["string", "null"]},
    },
}
POLL_SCHEMA = {
    "type": "object", "required": ["assignment", "job", "site_state"],
    "properties": {
        "assignment": {"anyOf": [ASSIGNMENT_SCHEMA, {"type": "null"}]},
        "job": {"anyOf": [{"type": "object"}, {"type": "null"}]},
        "site_state": {"type": "string"},
    },
}
_COUNT = {"type": "integer", "minimum": 0}
STREAM_REPORT = {
    "type": "object", "required": ["event"], "additionalProperties": False,
    "properties": {"event": {"enum": ["want", "resume", "ack", "complete", "fail"]}, "want": _COUNT, "held": _COUNT,
                   "chunks": _COUNT, "bytes": _COUNT, "acked": _COUNT, "skipped": _COUNT,
                   "reason": {"type": "string", "maxLength": 2000}},
}
SUBMIT_REQUEST = {
    "type": "object", "required": ["task_id", "result"], "additionalProperties": False,
    "properties": {"task_id": _NAME, "result": {}},
}
SUBMIT_RESPONSE = {
    "type": "object", "required": ["outcome", "counted"],
    "properties": {"outcome": {"enum": ["accepted", "late", "duplicate", "wrong_site", "unknown_task"]},
                   "counted": {"type": "boolean"}},
}
CHECK_RESPONSE = {
    "type": "object", "required": ["task_id", "client_task_id", "state", "task_state", "active", "send_count"],
    "properties": {"task_id": {"type": "string"}, "client_task_id": {"type": "string"},
                   "state": {"type": "string"}, "task_state": {"type": "string"},
                   "active": {"type": "boolean"}, "send_count": {"type": "integer"}},
}
HEARTBEAT_RESPONSE = {"type": "object", "required": ["site_state"], "properties": {"site_state": {"type": "string"}}}
JOB_SCHEMA = {
    "type": "object", "required": ["job_id", "name", "state", "spec"],
    "properties": {"job_id": {"type": "string"}, "name": {"type": "string"}, "state": {"type": "string"},
                   "spec": _JSON, "sites": {"type": "array"}, "reason": {"type": ["string", "null"]},
                   "result_hash": {"type": ["string", "null"]}, "rounds": {"type": "integer"},
                   "current_task": {"anyOf": [_JSON, {"type": "null"}]}},
}
JOB_LIST_SCHEMA = {"type": "object", "required": ["jobs"], "properties": {"jobs": {"type": "array"}}}
ABORT_REQUEST = {"type": "object", "additionalProperties": False,
                 "properties": {"reason": {"type": "string", "maxLength": 500}}}
SITES_SCHEMA = {"type": "object", "required": ["sites"], "properties": {"sites": {"type": "array"}}}
RESULT_SCHEMA = {"type": "object", "required": ["job_id", "state", "result"], "properties": {
    "job_id": {"type": "string"}, "state": {"type": "string"}, "result": {}, "result_hash": {}}}


def _server(request: Request) -> FedServer:
    server: FedServer = request.app.state
    return server


def _assignment(a: TaskAssignment) -> dict[str, Any]:
    return {"task_id": a.task_id, "client_task_id": a.client_task_id, "name": a.name, "data": a.data,
            "props": a.props, "resend": a.resend, "send_count": a.send_count, "hop": a.hop, "job_id": a.job_id}


async def poll(request: Request) -> Response:
    """Long poll: the site's next assignment (durably marked sent) or none after ``wait`` seconds."""
    site = request.path_params["site"]
    request.require_identity(site)
    server = _server(request)
    manager = server.manager
    wait = min(float(request.params["wait"]), MAX_POLL_WAIT_S)
    deadline = asyncio.get_running_loop().time() + wait
    while True:
        signal = manager.work_signal()  # taken before asking, so no change is missed
        assignment = await manager.process_task_request(site)
        left = deadline - asyncio.get_running_loop().time()
        if assignment is not None or left <= 0 or server.closing:
            break
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(signal.wait(), left)
    if assignment is not None:
        server.chunk_access.grant(site, assignment.data)
    job = None
    if assignment is not None and assignment.job_id:
        job = server.job_context(assignment.job_id)
        progress = manager.task_progress(assignment.task_id)
        if job is not None and progress is not None:
            job = {**job, "sites": sorted(progress["targets"])}  # the sites this task went to
    answer = None if assignment is None else _assignment(assignment)
    if assignment is not None and answer is not None and refs_in(assignment.data):
        answer["tensor_stream"] = await asyncio.to_thread(_stream_task_data, server, assignment, site)
    if assignment is not None and faults.armed():
        faults.maybe_crash(server.round_of(assignment.job_id, assignment.data), "dispatch")
    return json_response({"assignment": answer, "job": job, "site_state": manager.site_state(site) or "unknown"})


def _stream_task_data(server: FedServer, a: TaskAssignment, site: str) -> dict[str, Any]:
    """Record the site's share of the task's tensor data (the TensorServerStreamer role)."""
    config = server.tensor_stream_config(a.job_id)
    progress = server.manager.task_progress(a.task_id) or {}
    sessions = server.tensor_streamer.on_dispatch(
        job_id=a.job_id, round=server.round_of(a.job_id, a.data), task_id=a.task_id, task_name=a.name,
        client_task_id=a.client_task_id, site=site, data=a.data, targets=sorted(progress.get("targets") or [site]),
        config=config)
    return {"sessions": sessions, "tensor_send_timeout": config.tensor_send_timeout}


async def stream_report(request: Request) -> Response:
    """A site's progress on one of the server's task-data sessions to it (recorded on that session)."""
    site = request.path_params["site"]
    request.require_identity(site)
    session = request.path_params["session"]
    body = await request.json()
    event = body.pop("event")
    try:
        state = await asyncio.to_thread(_server(request).tensor_streamer.on_report, site, session, event, body)
    except KeyError:
        raise HttpError(404, "unknown_session", f"{site} has no task-data session {session!r}") from None
    return json_response({"state": state})


async def submit(request: Request) -> Response:
    """Submit the result of one of the site's assignments; idempotent (the id is the assignment's)."""
    site = request.path_params["site"]
    request.require_identity(site)
    body = await request.json()
    # checks the result's payloads and fsyncs them: on a thread, so other sites' requests go on meanwhile
    await asyncio.to_thread(require_payloads, _server(request).chunks, body["result"])
    try:
        outcome = await _server(request).manager.process_submission(
            site, body["task_id"], request.path_params["client_task_id"], body["result"])
    except TaskError as exc:
        raise HttpError(422, "invalid_result", str(exc), details={"argument": exc.argument}) from None
    if faults.armed() and outcome.value == "accepted":
        faults.maybe_crash(_server(request).round_of(body["task_id"].rsplit(".", 1)[0], None), "result")
    return json_response({"outcome": outcome.value, "counted": outcome.value in ("accepted", "duplicate")})


async def check(request: Request) -> Response:
    """Where one of the site's assignments stands (404 for anything not the site's)."""
    site = request.path_params["site"]
    request.require_identity(site)
    ct_id = request.path_params["client_task_id"]
    info = await _server(request).manager.process_task_check(site, ct_id)
    if info is None:
        raise HttpError(404, "unknown_assignment", f"{site} has no assignment {ct_id!r}")
    return json_response({"task_id": info.task_id, "client_task_id": info.client_task_id, "state": info.state,
                          "task_state": info.task_state, "active": info.active, "send_count": info.send_count})


async def heartbeat(request: Request) -> Response:
    """An explicit heartbeat (polls count as heartbeats too)."""
    site = request.path_params["site"]
    request.require_identity(site)
    state = await _server(request).manager.heartbeat(site)
    return json_response({"site_state": state})


async def submit_job(request: Request) -> Response:
    """Submit a job spec; it runs after the jobs submitted before it."""
    try:
        info = await _server(request).jobs.submit(await request.json())
    except JobSpecError as exc:
        raise HttpError(422, "invalid_job", str(exc), details={"field": exc.field}) from None
    return json_response(info.as_json(), status=201)


async def list_jobs(request: Request) -> Response:
    """Every job, oldest first."""
    return json_response({"jobs": [j.as_json() for j in _server(request).jobs.list()]})


def _job_id(request: Request) -> str:
    return request.path_params["job_id"]


async def show_job(request: Request) -> Response:
    """One job with its progress (rounds published, the standing task).

    With ``wait`` > 0 it is a long poll: the answer comes when the job's ``ETag``
    differs from ``seen`` (the one the caller last got), or after ``wait`` seconds.
    """
    jobs = _server(request).jobs
    wait = min(float(request.params["wait"]), MAX_POLL_WAIT_S)
    seen = request.params.get("seen")
    try:
        info = await jobs.watch(_job_id(request), seen, wait) if wait > 0 else jobs.show(_job_id(request))
    except UnknownMachine:
        raise HttpError(404, "unknown_job", f"no job {_job_id(request)!r}") from None
    return json_response(info.as_json(), headers={"ETag": f'"{info.tag}"'})


async def job_result(request: Request) -> Response:
    """A finished job's result (null before it finished)."""
    jobs = _server(request).jobs
    try:
        info = jobs.show(_job_id(request), detail=False)
    except UnknownMachine:
        raise HttpError(404, "unknown_job", f"no job {_job_id(request)!r}") from None
    return json_response({"job_id": info.job_id, "state": info.state, "result": await jobs.result(info.job_id),
                          "result_hash": info.result_hash})


async def abort_job(request: Request) -> Response:
    """Abort a job that has not ended; its standing tasks end ABORTED."""
    body = await request.json()
    reason = str(body.get("reason") or f"aborted by {request.identity.name if request.identity else 'admin'}")
    try:
        info = await _server(request).jobs.abort(_job_id(request), reason)
    except UnknownJob:
        raise HttpError(404, "unknown_job", f"no job {_job_id(request)!r}") from None
    return json_response(info.as_json())


async def list_sites(request: Request) -> Response:
    """Every provisioned site and its liveness state."""
    server = _server(request)
    return json_response({"sites": [{"site": s, "state": server.manager.site_state(s) or "unknown"}
                                     for s in server.jobs.sites]})


async def server_stats(request: Request) -> Response:
    """Traffic since this server process started and what its boot recovered."""
    server = _server(request)
    return json_response({"traffic": dict(request.app.traffic), "boot": dataclasses.asdict(server.boot),
                          "pid": os.getpid()})


def federation_router() -> Router:
    """The site and admin routes of a fedlog server."""
    site_path = "/v1/sites/{site}"
    ct_path = site_path + "/assignments/{client_task_id}"
    return Router([
        Route("POST", site_path + "/poll", poll, "Wait for the site's next assignment", roles=ANY_ROLE,
              query=(QueryParam("wait", "number", default=20.0, minimum=0, maximum=MAX_POLL_WAIT_S,
                                description="seconds to wait for work"),),
              response_schema=POLL_SCHEMA, tags=("sites",)),
        Route("POST", ct_path + "/result", submit, "Submit the result of an assignment (idempotent)",
              roles=ANY_ROLE, body="json", request_schema=SUBMIT_REQUEST, response_schema=SUBMIT_RESPONSE,
              tags=("sites",), errors=(422,)),
        Route("GET", ct_path, check, "Where one of the site's assignments stands", roles=ANY_ROLE,
              response_schema=CHECK_RESPONSE, tags=("sites",), errors=(404,)),
        Route("POST", site_path + "/streams/{session}", stream_report,
              "Report progress on a task-data session (the server records its side)", roles=ANY_ROLE, body="json",
              request_schema=STREAM_REPORT, response_schema={"type": "object", "required": ["state"]},
              tags=("sites",), errors=(404, 422)),
        Route("POST", site_path + "/heartbeat", heartbeat, "An explicit heartbeat", roles=ANY_ROLE,
              response_schema=HEARTBEAT_RESPONSE, tags=("sites",)),
        Route("GET", "/v1/stats", server_stats, "Traffic and boot figures of this server process",
              roles=ADMIN_ONLY, response_schema={"type": "object", "required": ["traffic", "boot", "pid"]},
              tags=("admin",)),
        Route("GET", "/v1/sites", list_sites, "The sites and their liveness", roles=ADMIN_ONLY,
              response_schema=SITES_SCHEMA, tags=("admin",)),
        Route("POST", "/v1/jobs", submit_job, "Submit a job", roles=ADMIN_ONLY, body="json",
              request_schema={"type": "object"}, response_schema=JOB_SCHEMA, status=201, tags=("admin",),
              errors=(422,)),
        Route("GET", "/v1/jobs", list_jobs, "List jobs", roles=ADMIN_ONLY, response_schema=JOB_LIST_SCHEMA,
              tags=("admin",)),
        Route("GET", "/v1/jobs/{job_id}", show_job, "Show a job and its progress", roles=ADMIN_ONLY,
              query=(QueryParam("wait", "number", default=0.0, minimum=0, maximum=MAX_POLL_WAIT_S,
                                description="long poll: answer when the job changed, at the latest after this "
                                            "many seconds (0: at once)"),
                     QueryParam("seen", "string", description="the ETag of the last answer: what is not news")),
              response_schema=JOB_SCHEMA, tags=("admin",), errors=(404,)),
        Route("GET", "/v1/jobs/{job_id}/result", job_result, "A finished job's result", roles=ADMIN_ONLY,
              response_schema=RESULT_SCHEMA, tags=("admin",), errors=(404,)),
        Route("POST", "/v1/jobs/{job_id}/abort", abort_job, "Abort a job", roles=ADMIN_ONLY, body="json",
              request_schema=ABORT_REQUEST, response_schema=JOB_SCHEMA, tags=("admin",), errors=(404, 409)),
    ])
