"""POST /webhook: Label Studio events -> a "bank" job (or the spool while Redis is down).

The event is a hint: the job reads what it names back from Label Studio (backend.jobs), so only
the ids it names are queued.
"""
from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, Response, jsonify

from backend import queueing
from backend.errors import BadRequest
from backend.web import openapi
from backend.web.errors import error_response
from backend.web.inputs import json_object, project_id
from backend.web.state import WebState, web_state

log = logging.getLogger(__name__)

WEBHOOK_EVENTS = frozenset(openapi.WEBHOOK_EVENTS)
TRAIN_TIMEOUT_S = 24 * 3600          # START_TRAINING rebuilds the bank and pre-annotates the project

bp = Blueprint("webhook", __name__)


@bp.post("/webhook")
def webhook() -> Response:
    state = web_state()
    body = json_object()
    action = body.get("action")
    if not isinstance(action, str) or not action:
        raise BadRequest("missing 'action'")
    if action not in WEBHOOK_EVENTS:
        state.metrics.inc("webhooks unknown")
        return jsonify({"status": "Unknown event"})
    state.metrics.inc(f"webhooks {action}")
    pid = _webhook_project(body)
    if action == "START_TRAINING":
        func, args, timeout = "backend.jobs.train.train_project", [pid], TRAIN_TIMEOUT_S
    else:
        func, args, timeout = "backend.jobs.webhook.apply_webhook", [pid, action, _webhook_hint(body)], None
    job_kwargs = {"timeout": timeout, "meta": {"project": pid, "event": action}}
    try:
        if state.replayer is not None and state.spool.pending():  # in order: none may overtake spooled events
            raise queueing.QueueUnavailable("earlier events are still spooled")
        job_id = queueing.enqueue(func, *args, queue="bank", **job_kwargs)
    except queueing.QueueUnavailable as exc:
        return _spool(state, pid, action, func, args, job_kwargs, exc)
    state.metrics.inc("jobs_enqueued bank")
    resp = jsonify({"status": "ok", "job": job_id})
    resp.status_code = 201
    return resp


def _spool(state: WebState, pid: int, action: str, func: str, args: list, job_kwargs: dict,
           exc: Exception) -> Response:
    """Redis cannot take the event: keep it in the durable spool (202), replayed when Redis is back."""
    try:
        state.spool.append(func, args, "bank", **job_kwargs)
    except OSError as disk:  # disk full / read-only: nowhere left to keep it
        state.metrics.inc("webhooks_lost")
        log.error("project %s: %s lost: it can be neither queued (%s) nor spooled (%s); "
                  "run Start training on the project once both work again", pid, action, exc, disk)
        return error_response(503, "Redis unavailable and the webhook spool cannot be written: the event is lost")
    state.metrics.inc("webhooks_spooled")
    log.warning("project %s: %s spooled (%s); replayed when Redis is back", pid, action, exc)
    resp = jsonify({"status": "spooled"})
    resp.status_code = 202
    return resp


def _ids(items: Any) -> list[dict]:
    """[{"id": ...}] of a webhook's list of objects, ids only (the rest is never queued)."""
    return [{"id": item["id"]} for item in items if isinstance(item, dict)
            and isinstance(item.get("id"), (int, str)) and not isinstance(item.get("id"), bool)] \
        if isinstance(items, list) else []


def _webhook_hint(body: dict) -> dict:
    """What a bank job needs of a webhook: the ids it names. The job reads the annotation, its task
    and the label config back from Label Studio, so nothing else of the (untrusted) payload is
    queued: no regions, no config, nothing that is not plain JSON."""
    hint: dict[str, Any] = {key: _ids(body.get(key)) for key in ("annotations", "tasks")}
    annotation = _ids([body.get("annotation")])
    if annotation:
        hint["annotation"] = annotation[0]
    return hint


def _webhook_project(body: dict) -> int:
    """Project id of a webhook payload: project.id, else the annotation's or task's project."""
    project = body.get("project")
    if isinstance(project, dict) and "id" in project:
        return project_id(project["id"], "project.id")
    for key in ("annotation", "task"):
        obj = body.get(key)
        if isinstance(obj, dict) and obj.get("project") is not None:
            return project_id(obj["project"], f"{key}.project")
    if project is not None and not isinstance(project, dict):
        return project_id(project)
    raise BadRequest("webhook payload names no project ('project.id')")
