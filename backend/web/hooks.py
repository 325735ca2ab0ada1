"""Around every request: HTTP basic auth (when configured), the spool replayer's lazy start, request
metrics and one log line."""
from __future__ import annotations

import hmac
import logging
import time

from flask import Flask, Response, g, request

from backend.web.errors import error_response
from backend.web.state import web_state

log = logging.getLogger(__name__)


def _before() -> Response | None:
    g.t0 = time.perf_counter()
    state = web_state()
    if state.replayer is not None:
        state.replayer.start()  # lazily, in the serving process (idempotent)
    settings = state.settings
    if settings.auth_enabled:
        auth = request.authorization
        user = (auth.username or "") if auth and auth.type == "basic" else ""
        password = (auth.password or "") if auth and auth.type == "basic" else ""
        ok_user = hmac.compare_digest(user.encode(), settings.basic_auth_user.encode())
        ok_pass = hmac.compare_digest(password.encode(), settings.basic_auth_pass.encode())
        if not (ok_user and ok_pass):
            state.metrics.inc("auth_failures")
            return error_response(401, "authentication required",
                                  {"WWW-Authenticate": 'Basic realm="ntt-backend", charset="UTF-8"'})
    return None


def _after(resp: Response) -> Response:
    metrics = web_state().metrics
    # keys only from our own routes and methods: clients cannot grow the metrics dict
    metrics.inc(f"requests {request.method} {request.url_rule.rule}" if request.url_rule
                else "requests <unrouted>")
    metrics.inc(f"responses {resp.status_code}")
    ms = (time.perf_counter() - g.get("t0", time.perf_counter())) * 1000
    log.info("%s %s -> %d (%.1f ms)", request.method, request.path, resp.status_code, ms)
    return resp


def register_hooks(app: Flask) -> None:
    """_before and _after on every request of `app`."""
    app.before_request(_before)
    app.after_request(_after)
