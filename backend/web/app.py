"""The Label Studio ML backend web process: Label Studio's wire protocol on top of the job queue.

It never loads a model. Run it threaded, one process (no --preload needed, nothing heavy at import):

    gunicorn --bind :9090 --config python:backend.web.gunicorn_conf _wsgi:app   (WEB_THREADS threads)

Routes (protocol: LS 1.23; timeouts LS applies: /health 1 s, /setup 3 s, /predict 100 s, webhooks 1 s):

* GET / and /health  liveness + queue/Redis status; always 200 and fast (reads a snapshot).
* POST /setup        validates and stores the project's label config and LS connection; returns
                     the project's model_version (changes whenever its memory bank changes).
* POST /predict      one item per task, in order. Each task is a "predict" job (ids, image URL and
                     the label config's hash: backend/web/routes_predict.py); the request waits up
                     to PREDICT_BUDGET_S. A job still running then is handed over to the workers
                     (store.claim(delivery_key, "api")), which post its prediction through the LS API
                     later; its item here has no "result" key, and so has a failed task's item
                     ({"model_version", "error"}): LS 1.23 skips such items instead of storing an
                     empty prediction, so the task is predicted again next time. At most
                     WEB_THREADS - 2 calls wait at once (Settings.predict_waiting_calls); the others
                     hand over at once, so LS's /health and /setup always find a free thread.
* POST /webhook      annotation / task / project events -> a "bank" job; 201 at once. The event is a
                     hint: the job reads what it names back from Label Studio (backend.jobs). While
                     Redis is down the job goes to a durable spool (202 {"status": "spooled"}) that a
                     background thread replays when Redis is back.
* GET /versions      the project's model_version (JSON body or ?project=); without a project, the
                     versions of every project known (LS 1.23.2 names none).
* GET /evaluation?project=<id>   the project's last evaluation (JSON; status running/done);
  POST /evaluation?project=<id>  queues one (backend.jobs.evaluation).
* GET /report?project=<id>       the last evaluation as one self-contained HTML page.
* GET /metrics, /jobs (?id=<job id> for one, with its progress meta), /openapi.json.

Every error is JSON {"error": "..."}; bad input gets a 4xx with a message, never a 500.

Modules: routes_predict (with predict_wait, the wait/hand-over protocol), routes_webhook,
routes_admin, routes_quality; inputs (request parsing), errors and hooks (auth, metrics, logging);
state (what the routes of one app share, on app.extensions["ntt"]).
"""
from __future__ import annotations

from flask import Flask

from backend import queueing, runtime
from backend.settings import Settings
from backend.web import routes_admin, routes_predict, routes_quality, routes_webhook
from backend.web.errors import register_error_handlers
from backend.web.hooks import register_hooks
from backend.web.state import WebState


def create_app(settings: Settings | None = None) -> Flask:
    """The WSGI app; loads no model, opens no connection until the first request needs one.
    Without REDIS_URL it opens the embedded queue now: jobs queued before a restart resume at
    once, and a second process on the same MODEL_DIR fails to start (QueueInUse) instead of
    running the first one's jobs again.

    `settings` (tests) become the process settings (runtime.configure), which the queue and the
    embedded jobs read too.
    """
    if settings is not None:
        runtime.configure(settings=settings)
    settings = runtime.get_settings()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = int(settings.max_request_mb * 2**20)
    app.json.sort_keys = False
    app.extensions["ntt"] = WebState.build(settings)
    if not settings.redis_url:
        queueing.backend()
    register_hooks(app)
    register_error_handlers(app)
    for routes in (routes_admin, routes_predict, routes_webhook, routes_quality):
        app.register_blueprint(routes.bp)
    return app
