"""Liveness, project setup and operator routes: /, /health, /setup, /versions, /openapi.json,
/metrics, /jobs."""
from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify, request

from backend import queueing, runtime
from backend.errors import BadRequest
from backend.regions.label_config import parse_label_config
from backend.web import openapi
from backend.web.errors import error_response
from backend.web.inputs import json_body, json_object, project_id
from backend.web.state import web_state

MODEL_CLASS = "NTTBackend"

bp = Blueprint("admin", __name__)


@bp.get("/")
@bp.get("/health")
def health() -> Response:
    queue = queueing.health()
    if web_state().settings.redis_url:
        redis_state = "ok" if queue.get("ok") else "degraded"
        ready = bool(queue.get("ok")) and sum(queue.get("workers", {}).values()) > 0
    else:
        redis_state, ready = "disabled", True  # embedded: the worker thread starts on demand
    return jsonify({"status": "UP", "model_class": MODEL_CLASS, "model": runtime.engine_name(),
                    "ready": ready, "queue": queue, "redis": redis_state})


@bp.post("/setup")
def setup() -> Response:
    body = json_object()
    pid = project_id(body.get("project"))
    schema = body.get("schema")
    if not isinstance(schema, str):
        raise BadRequest("missing 'schema' (the project's label config XML)")
    parse_label_config(schema)  # UnsupportedConfig (a BadRequest) -> 400 with the reason
    banks = runtime.get_bank_store()
    if banks.label_config(pid) != schema:
        banks.set_label_config(pid, schema)
    hostname, token = body.get("hostname"), body.get("access_token")
    hostname = hostname if isinstance(hostname, str) and hostname else None
    token = token if isinstance(token, str) and token else None
    if (hostname or token) and banks.ls_connection(pid) != (hostname, token):
        banks.set_ls_connection(pid, hostname, token)
    return jsonify({"model_version": runtime.model_version(pid)})


@bp.get("/versions")
def versions() -> Response:
    """The project's model_version; without a project (LS 1.23.2 sends none, and nothing else
    tells which project asks), those of every project known."""
    body = json_body(required=False)
    project = body.get("project") if isinstance(body, dict) else None
    project = project if project is not None else request.args.get("project")
    if project is None:
        known = runtime.get_bank_store().projects()
        return jsonify({"versions": sorted({runtime.model_version(pid) for pid in known})})
    return jsonify({"versions": [runtime.model_version(project_id(project))]})


@bp.get("/openapi.json")
def openapi_spec() -> Response:
    return jsonify(openapi.spec(auth=web_state().settings.auth_enabled))


@bp.get("/metrics")
def get_metrics() -> Response:
    state = web_state()
    out: dict[str, Any] = state.metrics.snapshot()
    out["spooled_pending"] = len(state.spool)
    if state.replayer is not None:
        out["spool_replayed"] = state.replayer.replayed
    return jsonify(out)


@bp.get("/jobs")
def jobs() -> Response:
    job_id = request.args.get("id")
    if job_id:
        info = queueing.fetch(job_id[:200])
        if info is None:
            return error_response(404, f"no job {job_id[:200]!r} (unknown or expired)")
        return jsonify(info.to_dict(with_result=True))
    try:
        limit = min(max(int(request.args.get("limit", 50)), 1), 500)
    except ValueError:
        raise BadRequest("'limit' must be an integer") from None
    return jsonify({"jobs": [j.to_dict() for j in queueing.list_jobs(limit)]})
