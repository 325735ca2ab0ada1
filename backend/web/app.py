"""The Label Studio ML backend web process: Label Studio's wire protocol on top of the job queue.

It never loads a model. Run it threaded, one process (no --preload needed, nothing heavy at import):

    gunicorn --bind :9090 --config python:backend.web.gunicorn_conf _wsgi:app   (WEB_THREADS threads)

Routes (protocol: LS 1.23; timeouts LS applies: /health 1 s, /setup 3 s, /predict 100 s, webhooks 1 s):

* GET / and /health  liveness + queue/Redis status; always 200 and fast (reads a snapshot).
* POST /setup        validates and stores the project's label config and LS connection; returns
                     the project's model_version (changes whenever its memory bank changes).
* POST /predict      one item per task, in order. Each task is a "predict" job; the request waits up
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
"""
from __future__ import annotations

import hmac
import json
import logging
import threading
import time
import uuid
from collections import Counter
from typing import Any

import redis
from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException, NotFound, RequestEntityTooLarge

from backend import runtime
from backend.jobs import evaluation as evaluation_job
from backend.web import openapi
from backend import queueing
from backend.storage import label_configs
from backend.storage.bank_store import EMPTY_VERSION
from backend.errors import BadRequest
from backend.regions.interactive import is_interactive, read_context
from backend.regions.label_config import parse_label_config
from backend.settings import Settings
from backend.storage.tasks_registry import result_hash

log = logging.getLogger(__name__)

MODEL_CLASS = "NTTBackend"
WEBHOOK_EVENTS = frozenset(openapi.WEBHOOK_EVENTS)
TRAIN_TIMEOUT_S = 24 * 3600          # START_TRAINING rebuilds the bank and pre-annotates the project
HANDOVER_GRACE_S = 5.0               # the job claimed delivery to the web: its result is moments away
POLL_START_S, POLL_MAX_S = 0.02, 0.25
POLL_CLICK_S = 0.02                  # an annotator waits on a click: poll its job at this pace


class Metrics:
    """Process-local counters for GET /metrics."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def inc(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


# ------------------------------------------------------------------------------------------ input
def _json_body(required: bool = True) -> Any:
    """The request body as JSON (any content type); BadRequest when malformed."""
    raw = request.get_data(cache=True)  # 413 past MAX_CONTENT_LENGTH when Content-Length says so
    limit = request.max_content_length
    if (request.content_length is None and limit is not None and len(raw) >= limit
            and request.environ["wsgi.input"].read(1)):
        raise RequestEntityTooLarge()  # chunked body: werkzeug stops reading at the limit silently
    if not raw or not raw.strip():
        if required:
            raise BadRequest("request body must be a JSON object")
        return None
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"malformed JSON: {str(exc)[:200]}") from None


def _json_object() -> dict:
    body = _json_body()
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    return body


def _project_id(value: Any, where: str = "project") -> int:
    """'7.1717000000' (LS '<id>.<created_at>'), 7 or '7' -> 7."""
    if isinstance(value, bool) or value is None:
        raise BadRequest(f"missing or invalid '{where}'; expected \"<project id>.<timestamp>\"")
    text = str(value).split(".")[0].strip()
    if not text.isdigit() or len(text) > 18:
        raise BadRequest(f"invalid '{where}' {str(value)[:40]!r}; expected \"<project id>.<timestamp>\"")
    return int(text)


def _task_error(task: Any, value_key: str) -> str | None:
    """Why this task cannot be predicted (None if it can)."""
    if not isinstance(task, dict):
        return "task is not a JSON object"
    task_id = task.get("id")
    if task_id is None:
        return "task has no 'id'"
    if isinstance(task_id, bool) or not (isinstance(task_id, int) or str(task_id).strip().isdigit()):
        return f"task id {str(task_id)[:40]!r} is not an integer"
    data = task.get("data")
    if not isinstance(data, dict):
        return f"task {task_id} has no 'data' object"
    if not isinstance(data.get(value_key), str) or not data[value_key].strip():
        return f"task {task_id} has no image URL in data['{value_key}']"
    return None


# ------------------------------------------------------------------------------------------ app
def create_app(settings: Settings | None = None) -> Flask:
    """The WSGI app; loads no model, opens no connection until the first request needs one.

    `settings` (tests) become the process settings (runtime.configure), which the queue and the
    embedded jobs read too.
    """
    if settings is not None:
        runtime.configure(settings=settings)
    settings = runtime.get_settings()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = int(settings.max_request_mb * 2**20)
    app.json.sort_keys = False
    metrics = Metrics()
    spool = queueing.Spool(settings.spool_dir)
    replayer = queueing.SpoolReplayer(spool, settings) if settings.redis_url else None
    app.extensions["ntt"] = {"settings": settings, "metrics": metrics, "spool": spool, "replayer": replayer}
    wait_slots = threading.BoundedSemaphore(settings.predict_waiting_calls)  # see _wait

    def error(status: int, message: str, headers: dict | None = None) -> Response:
        resp = jsonify({"error": message})
        resp.status_code = status
        resp.headers.update(headers or {})
        return resp

    # -------------------------------------------------------------------- hooks
    @app.before_request
    def _before() -> Response | None:
        g.t0 = time.perf_counter()
        if replayer is not None:
            replayer.start()  # lazily, in the serving process (idempotent)
        if settings.auth_enabled:
            auth = request.authorization
            user = (auth.username or "") if auth and auth.type == "basic" else ""
            password = (auth.password or "") if auth and auth.type == "basic" else ""
            ok_user = hmac.compare_digest(user.encode(), settings.basic_auth_user.encode())
            ok_pass = hmac.compare_digest(password.encode(), settings.basic_auth_pass.encode())
            if not (ok_user and ok_pass):
                metrics.inc("auth_failures")
                return error(401, "authentication required",
                             {"WWW-Authenticate": 'Basic realm="ntt-backend", charset="UTF-8"'})
        return None

    @app.after_request
    def _after(resp: Response) -> Response:
        # keys only from our own routes and methods: clients cannot grow the metrics dict
        metrics.inc(f"requests {request.method} {request.url_rule.rule}" if request.url_rule
                    else "requests <unrouted>")
        metrics.inc(f"responses {resp.status_code}")
        ms = (time.perf_counter() - g.get("t0", time.perf_counter())) * 1000
        log.info("%s %s -> %d (%.1f ms)", request.method, request.path, resp.status_code, ms)
        return resp

    @app.errorhandler(BadRequest)
    def _bad_request(exc: BadRequest) -> Response:
        return error(400, str(exc))

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        if exc.code == 413:
            return error(413, f"request body larger than MAX_REQUEST_MB={settings.max_request_mb:g}")
        headers = {k: v for k, v in exc.get_headers() if k.lower() != "content-type"}  # e.g. Allow on 405
        return error(exc.code or 500, exc.description or exc.name, headers)

    @app.errorhandler(queueing.QueueUnavailable)
    @app.errorhandler(redis.exceptions.RedisError)
    def _unavailable(exc: Exception) -> Response:
        log.warning("%s %s: Redis unavailable (%s)", request.method, request.path, type(exc).__name__)
        return error(503, "Redis unavailable; try again later")

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.path)
        metrics.inc("errors_500")
        return error(500, "internal error; see the backend log")

    # -------------------------------------------------------------------- routes
    @app.get("/")
    @app.get("/health")
    def health() -> Response:
        queue = queueing.health()
        if settings.redis_url:
            redis_state = "ok" if queue.get("ok") else "degraded"
            ready = bool(queue.get("ok")) and sum(queue.get("workers", {}).values()) > 0
        else:
            redis_state, ready = "disabled", True  # embedded: the worker thread starts on demand
        return jsonify({"status": "UP", "model_class": MODEL_CLASS, "model": runtime.engine_name(),
                        "ready": ready, "queue": queue, "redis": redis_state})

    @app.post("/setup")
    def setup() -> Response:
        body = _json_object()
        pid = _project_id(body.get("project"))
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

    @app.post("/predict")
    def predict() -> Response:
        body = _json_object()
        tasks = body.get("tasks")
        if not isinstance(tasks, list):
            raise BadRequest("missing 'tasks' (a list of tasks)")
        project = body.get("project")
        if project is None and tasks and isinstance(tasks[0], dict):
            project = tasks[0].get("project")
        pid = _project_id(project)
        xml = body.get("label_config")
        if isinstance(xml, str) and xml.strip():
            parse_label_config(xml)  # an unsupported config is the request's fault: 400
        interactive = is_interactive(body.get("params"))
        metrics.inc("clicks" if interactive else "tasks_predicted", 1 if interactive else len(tasks))
        try:
            if not isinstance(xml, str) or not xml.strip():
                xml = runtime.get_bank_store().label_config(pid)
                if xml is None:
                    raise BadRequest("missing 'label_config' and the project was never set up (/setup)")
            if interactive:
                results = [_segment(pid, tasks, xml, body["params"]["context"])]
            else:
                results = _predict_tasks(pid, tasks, xml, parse_label_config(xml).value_key)
        except (redis.exceptions.RedisError, queueing.QueueUnavailable) as exc:
            # every task fails alone, without "result": LS keeps them unpredicted and asks again later
            log.warning("POST /predict: Redis unavailable (%s); %d task(s) answered with an error",
                        type(exc).__name__, len(tasks))
            results = [{"error": "Redis unavailable; try again later"} for _ in tasks]
        return jsonify({"results": results})

    def _segment(pid: int, tasks: list, xml: str, context: dict) -> dict:
        """An interactive /predict: one "interactive" job, waited for on a /predict waiting slot
        until PREDICT_BUDGET_S; the item of its mask (or an error item: LS shows no suggestion)."""
        config = parse_label_config(xml)
        if len(tasks) != 1:
            raise BadRequest(f"an interactive /predict holds one task, got {len(tasks)}")
        reason = _task_error(tasks[0], config.value_key)
        if reason:
            raise BadRequest(reason)
        prompt = read_context(context, config)  # BadRequest (400) for a context we cannot use
        task = {"id": int(tasks[0]["id"]), "data": {config.value_key: tasks[0]["data"][config.value_key]}}
        mv = runtime.model_version(pid)
        expires_at = time.time() + settings.predict_budget_s
        config_hash = label_configs.put(runtime.get_store(), xml)
        job_id = queueing.enqueue("backend.jobs.interactive.segment_task", pid, task["id"],
                                  task["data"][config.value_key], config_hash, prompt.to_json(), expires_at,
                                  queue="interactive", retries=0, timeout=max(60, int(settings.predict_budget_s) + 30),
                                  meta={"project": pid, "task": task["id"], "interactive": True})
        metrics.inc("jobs_enqueued interactive")
        items: list = [None]
        pending = {0: (job_id, "")}
        _wait(pending, items, mv, time.monotonic() + settings.predict_budget_s, max_pause=POLL_CLICK_S)
        _collect(pending, items, mv)
        if pending:
            return {"model_version": mv, "error": "the click was not answered within PREDICT_BUDGET_S "
                    "(workers busy, or every /predict waiting slot taken)"}
        return items[0]

    def _predict_tasks(pid: int, tasks: list, xml: str, value_key: str) -> list[dict]:
        version = runtime.get_bank_store().version(pid)
        mv = runtime.model_version(pid, version)
        items: list[dict | None] = [None] * len(tasks)
        for i, task in enumerate(tasks):
            reason = _task_error(task, value_key)
            if reason:
                items[i] = {"model_version": mv, "error": reason}
        todo = [i for i in range(len(tasks)) if items[i] is None]
        # one task: it was opened in the editor, where clicks may follow (a page of tasks is not)
        warm = len(tasks) == 1 and bool(todo) and bool(parse_label_config(xml).prompts)
        if todo and version == EMPTY_VERSION:
            if warm:
                _warm(pid, tasks[todo[0]], xml, value_key)
            for i in todo:  # nothing to match against: a valid, empty prediction
                items[i] = {"result": [], "score": 0.0, "model_version": mv}
            # registered like a predict job's tasks, so the first reference's refresh updates them
            # (LS stores each item as a new prediction whose id we do not learn)
            runtime.get_registry().update(pid, {int(tasks[i]["id"]): {
                "image_url": tasks[i]["data"][value_key], "prediction_id": None, "model_version": mv,
                "result_hash": result_hash([])} for i in todo})
            return items

        deadline = time.monotonic() + settings.predict_budget_s
        pending: dict[int, tuple[str, str]] = {}  # task index -> (job id, delivery key)
        config_hash = label_configs.put(runtime.get_store(), xml)
        for n, i in enumerate(todo):
            key = f"delivery:{pid}:{uuid.uuid4().hex}"
            try:
                job_id = queueing.enqueue("backend.jobs.predict.predict_task", pid, int(tasks[i]["id"]),
                                          tasks[i]["data"][value_key], config_hash, delivery_key=key,
                                          queue="predict", retries=1, **({"warm": True} if warm else {}),
                                          meta={"project": pid, "task": tasks[i]["id"]})
            except queueing.QueueUnavailable as exc:  # one timeout, not one per remaining task
                for j in todo[n:]:
                    items[j] = {"model_version": mv, "error": f"queue unavailable, try again later ({exc})"}
                break
            pending[i] = (job_id, key)
            metrics.inc("jobs_enqueued predict")

        _wait(pending, items, mv, deadline)
        _collect(pending, items, mv)
        if pending:
            _hand_over(pid, pending, items, mv)
        return items

    def _warm(pid: int, task: dict, xml: str, value_key: str) -> None:
        """Queue the SAM2 embedding of an opened task's image (no prediction job runs a model for
        it: the bank is empty); best effort."""
        task = {"id": int(task["id"]), "data": {value_key: task["data"][value_key]}}
        try:
            queueing.enqueue("backend.jobs.interactive.warm_task", pid, task["id"], task["data"][value_key],
                             label_configs.put(runtime.get_store(), xml), queue="predict", retries=0,
                             meta={"project": pid, "task": task["id"]})
        except queueing.QueueUnavailable as exc:
            log.info("project %s task %s: not warmed (%s)", pid, task["id"], exc)

    def _wait(pending: dict[int, tuple[str, str]], items: list, mv: str, deadline: float,
              max_pause: float = POLL_MAX_S) -> None:
        """Collect results until `deadline`, on one of the bounded waiting slots: with every slot
        taken the call does not wait (its jobs are handed over at once), so waiting /predict calls
        never take the web threads /health and /setup need."""
        if not pending:
            return
        if not wait_slots.acquire(blocking=False):
            metrics.inc("predict_calls_not_waited")
            return
        try:
            pause = POLL_START_S
            while pending and time.monotonic() < deadline:
                _collect(pending, items, mv)
                if pending:
                    time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
                    pause = min(pause * 1.5, max_pause)
        finally:
            wait_slots.release()

    def _collect(pending: dict[int, tuple[str, str]], items: list, mv: str) -> None:
        """Move finished/failed jobs from `pending` into `items`."""
        indexes = list(pending)
        try:
            infos = queueing.fetch_many([pending[i][0] for i in indexes])
        except queueing.QueueUnavailable:
            return  # Redis blipped: try again on the next round
        for i, info in zip(indexes, infos):
            if info is None:
                items[i] = {"model_version": mv, "error": "prediction job expired or was lost"}
            elif info.status == "finished":
                items[i] = _as_item(info.result, mv)
            elif info.done:
                items[i] = {"model_version": mv, "error": info.error or info.status}
            else:
                continue
            del pending[i]

    def _hand_over(pid: int, pending: dict[int, tuple[str, str]], items: list, mv: str) -> None:
        """Deadline reached: the workers deliver through the LS API whatever we win the claim for."""
        store = runtime.get_store()
        waiting = {}
        for i, (job_id, key) in pending.items():
            try:
                winner = store.claim(key, "api")
            except Exception as exc:  # noqa: BLE001 - store down: the job will deliver to nobody
                log.warning("project %s: delivery claim for job %s failed: %s", pid, job_id, type(exc).__name__)
                items[i] = {"model_version": mv, "error": "prediction did not finish in time"}
                continue
            if winner == "api":
                metrics.inc("predictions_deferred")
                items[i] = {"model_version": mv, "status": "deferred", "job": job_id,
                            "detail": "still running; the workers will post it to Label Studio"}
            else:
                waiting[i] = (job_id, key)
        grace_end = time.monotonic() + HANDOVER_GRACE_S
        while waiting and time.monotonic() < grace_end:
            _collect(waiting, items, mv)
            if waiting:
                time.sleep(POLL_START_S)
        for i, (job_id, _) in waiting.items():
            items[i] = {"model_version": mv, "error": f"job {job_id} finished but its result was not readable"}

    @app.post("/webhook")
    def webhook() -> Response:
        body = _json_object()
        action = body.get("action")
        if not isinstance(action, str) or not action:
            raise BadRequest("missing 'action'")
        if action not in WEBHOOK_EVENTS:
            metrics.inc("webhooks unknown")
            return jsonify({"status": "Unknown event"})
        metrics.inc(f"webhooks {action}")
        pid = _webhook_project(body)
        if action == "START_TRAINING":
            func, args, timeout = "backend.jobs.train.train_project", [pid], TRAIN_TIMEOUT_S
        else:
            func, args, timeout = "backend.jobs.webhook.apply_webhook", [pid, action, _webhook_hint(body)], None
        job_kwargs = {"timeout": timeout, "meta": {"project": pid, "event": action}}
        try:
            if replayer is not None and spool.pending():  # in order: none may overtake spooled events
                raise queueing.QueueUnavailable("earlier events are still spooled")
            job_id = queueing.enqueue(func, *args, queue="bank", **job_kwargs)
        except queueing.QueueUnavailable as exc:
            try:
                spool.append(func, args, "bank", **job_kwargs)
            except OSError as disk:  # disk full / read-only: nowhere left to keep it
                metrics.inc("webhooks_lost")
                log.error("project %s: %s lost: it can be neither queued (%s) nor spooled (%s); "
                          "run Start training on the project once both work again", pid, action, exc, disk)
                return error(503, "Redis unavailable and the webhook spool cannot be written: the event is lost")
            metrics.inc("webhooks_spooled")
            log.warning("project %s: %s spooled (%s); replayed when Redis is back", pid, action, exc)
            resp = jsonify({"status": "spooled"})
            resp.status_code = 202
            return resp
        metrics.inc("jobs_enqueued bank")
        resp = jsonify({"status": "ok", "job": job_id})
        resp.status_code = 201
        return resp

    @app.get("/versions")
    def versions() -> Response:
        """The project's model_version; without a project (LS 1.23.2 sends none, and nothing else
        tells which project asks), those of every project known."""
        body = _json_body(required=False)
        project = body.get("project") if isinstance(body, dict) else None
        project = project if project is not None else request.args.get("project")
        if project is None:
            known = runtime.get_bank_store().projects()
            return jsonify({"versions": sorted({runtime.model_version(pid) for pid in known})})
        return jsonify({"versions": [runtime.model_version(_project_id(project))]})

    def _known_project() -> int:
        """?project=<id> of a project this backend was set up for (else 400 / 404)."""
        project = request.args.get("project")
        if project is None:
            raise BadRequest("missing '?project=<project id>'")
        pid = _project_id(project)
        if runtime.get_bank_store().label_config(pid) is None:
            raise NotFound(f"project {pid} was never set up on this backend")
        return pid

    @app.get("/evaluation")
    def get_evaluation() -> Response:
        pid = _known_project()
        result = evaluation_job.status(pid)
        if result is None:
            return error(404, f"project {pid} has no evaluation yet; POST /evaluation?project={pid} starts one")
        return jsonify(result)

    @app.post("/evaluation")
    def post_evaluation() -> Response:
        pid = _known_project()
        job_id = evaluation_job.schedule(pid, runtime.get_bank_store().version(pid), on_demand=True)
        metrics.inc("evaluations_requested")
        resp = jsonify({"status": "queued" if job_id else "already queued", "job": job_id})
        resp.status_code = 202
        return resp

    @app.get("/report")
    def report() -> Response:
        from backend.quality.report import render_report  # cv2, numpy: on first use only

        pid = _known_project()
        result = runtime.get_bank_store().evaluation(pid)
        if result is None:
            return error(404, f"project {pid} has no evaluation yet; POST /evaluation?project={pid} starts one")
        page = render_report(result, evaluation_job.thumbnails(pid), title=f"Pre-annotation quality, project {pid}")
        return Response(page, mimetype="text/html")

    @app.get("/openapi.json")
    def openapi_spec() -> Response:
        return jsonify(openapi.spec(auth=settings.auth_enabled))

    @app.get("/metrics")
    def get_metrics() -> Response:
        out: dict[str, Any] = metrics.snapshot()
        out["spooled_pending"] = len(spool)
        if replayer is not None:
            out["spool_replayed"] = replayer.replayed
        return jsonify(out)

    @app.get("/jobs")
    def jobs() -> Response:
        job_id = request.args.get("id")
        if job_id:
            info = queueing.fetch(job_id[:200])
            if info is None:
                return error(404, f"no job {job_id[:200]!r} (unknown or expired)")
            return jsonify(info.to_dict(with_result=True))
        try:
            limit = min(max(int(request.args.get("limit", 50)), 1), 500)
        except ValueError:
            raise BadRequest("'limit' must be an integer") from None
        return jsonify({"jobs": [j.to_dict() for j in queueing.list_jobs(limit)]})

    return app


def _as_item(result: Any, mv: str) -> dict:
    """A job's return value as a /predict item (an LS prediction, or an error item)."""
    if isinstance(result, dict) and isinstance(result.get("result"), list):
        return {"model_version": mv, **result}
    if isinstance(result, dict) and result.get("error"):
        return {"model_version": result.get("model_version", mv), "error": str(result["error"])}
    return {"model_version": mv, "error": "prediction job returned no result"}


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
        return _project_id(project["id"], "project.id")
    for key in ("annotation", "task"):
        obj = body.get(key)
        if isinstance(obj, dict) and obj.get("project") is not None:
            return _project_id(obj["project"], f"{key}.project")
    if project is not None and not isinstance(project, dict):
        return _project_id(project)
    raise BadRequest("webhook payload names no project ('project.id')")
