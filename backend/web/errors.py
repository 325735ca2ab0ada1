"""Every error the web answers is JSON {"error": "..."}: bad input a 4xx with a message, Redis down
503, anything unexpected 500 (details in the log only)."""
from __future__ import annotations

import logging

import redis
from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from backend import queueing
from backend.errors import BadRequest
from backend.web.state import web_state

log = logging.getLogger(__name__)


def error_response(status: int, message: str, headers: dict | None = None) -> Response:
    """{"error": message} with this status (and headers)."""
    resp = jsonify({"error": message})
    resp.status_code = status
    resp.headers.update(headers or {})
    return resp


def _bad_request(exc: BadRequest) -> Response:
    return error_response(400, str(exc))


def _http_error(exc: HTTPException) -> Response:
    if exc.code == 413:
        return error_response(413, f"request body larger than MAX_REQUEST_MB={web_state().settings.max_request_mb:g}")
    headers = {k: v for k, v in exc.get_headers() if k.lower() != "content-type"}  # e.g. Allow on 405
    return error_response(exc.code or 500, exc.description or exc.name, headers)


def _unavailable(exc: Exception) -> Response:
    log.warning("%s %s: Redis unavailable (%s)", request.method, request.path, type(exc).__name__)
    return error_response(503, "Redis unavailable; try again later")


def _unexpected(exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.path)
    web_state().metrics.inc("errors_500")
    return error_response(500, "internal error; see the backend log")


def register_error_handlers(app: Flask) -> None:
    """The handlers above, on every route of `app` (and on unrouted requests)."""
    app.register_error_handler(BadRequest, _bad_request)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(queueing.QueueUnavailable, _unavailable)
    app.register_error_handler(redis.exceptions.RedisError, _unavailable)
    app.register_error_handler(Exception, _unexpected)
