"""Pre-annotation quality: GET/POST /evaluation and GET /report (backend.jobs.evaluation)."""
from __future__ import annotations

from flask import Blueprint, Response, jsonify, request
from werkzeug.exceptions import NotFound

from backend import runtime
from backend.errors import BadRequest
from backend.jobs import evaluation as evaluation_job
from backend.web.errors import error_response
from backend.web.inputs import project_id
from backend.web.state import web_state

bp = Blueprint("quality", __name__)


def _known_project() -> int:
    """?project=<id> of a project this backend was set up for (else 400 / 404)."""
    project = request.args.get("project")
    if project is None:
        raise BadRequest("missing '?project=<project id>'")
    pid = project_id(project)
    if runtime.get_bank_store().label_config(pid) is None:
        raise NotFound(f"project {pid} was never set up on this backend")
    return pid


def _no_evaluation(pid: int) -> Response:
    return error_response(404, f"project {pid} has no evaluation yet; POST /evaluation?project={pid} starts one")


@bp.get("/evaluation")
def get_evaluation() -> Response:
    pid = _known_project()
    result = evaluation_job.status(pid)
    return _no_evaluation(pid) if result is None else jsonify(result)


@bp.post("/evaluation")
def post_evaluation() -> Response:
    pid = _known_project()
    job_id = evaluation_job.schedule(pid, runtime.get_bank_store().version(pid), on_demand=True)
    web_state().metrics.inc("evaluations_requested")
    resp = jsonify({"status": "queued" if job_id else "already queued", "job": job_id})
    resp.status_code = 202
    return resp


@bp.get("/report")
def report() -> Response:
    from backend.quality.report import render_report  # cv2, numpy: on first use only

    pid = _known_project()
    result = runtime.get_bank_store().evaluation(pid)
    if result is None:
        return _no_evaluation(pid)
    page = render_report(result, evaluation_job.thumbnails(pid), title=f"Pre-annotation quality, project {pid}")
    return Response(page, mimetype="text/html")
