"""POST /predict: one item per task, in order (the protocol: backend/web/app.py's docstring).

A job carries what it needs and nothing more: the project and task ids, the image URL and the hash
under which the label config XML is stored once per call (backend.storage.label_configs); never the
task's annotations, predictions or the XML itself.
"""
from __future__ import annotations

import logging
import time
import uuid

import redis
from flask import Blueprint, Response, jsonify

from backend import queueing, runtime
from backend.errors import BadRequest
from backend.regions.interactive import is_interactive, read_context
from backend.regions.label_config import parse_label_config
from backend.storage import label_configs
from backend.storage.bank_store import EMPTY_VERSION
from backend.storage.tasks_registry import result_hash
from backend.web.inputs import json_object, project_id, task_error
from backend.web.predict_wait import POLL_CLICK_S, Pending, collect
from backend.web.state import WebState, web_state

log = logging.getLogger(__name__)

bp = Blueprint("predict", __name__)


@bp.post("/predict")
def predict() -> Response:
    state = web_state()
    body = json_object()
    tasks = body.get("tasks")
    if not isinstance(tasks, list):
        raise BadRequest("missing 'tasks' (a list of tasks)")
    project = body.get("project")
    if project is None and tasks and isinstance(tasks[0], dict):
        project = tasks[0].get("project")
    pid = project_id(project)
    xml = body.get("label_config")
    if isinstance(xml, str) and xml.strip():
        parse_label_config(xml)  # an unsupported config is the request's fault: 400
    interactive = is_interactive(body.get("params"))
    state.metrics.inc("clicks" if interactive else "tasks_predicted", 1 if interactive else len(tasks))
    try:
        if not isinstance(xml, str) or not xml.strip():
            xml = runtime.get_bank_store().label_config(pid)
            if xml is None:
                raise BadRequest("missing 'label_config' and the project was never set up (/setup)")
        if interactive:
            results = [_segment(state, pid, tasks, xml, body["params"]["context"])]
        else:
            results = _predict_tasks(state, pid, tasks, xml)
    except (redis.exceptions.RedisError, queueing.QueueUnavailable) as exc:
        # every task fails alone, without "result": LS keeps them unpredicted and asks again later
        log.warning("POST /predict: Redis unavailable (%s); %d task(s) answered with an error",
                    type(exc).__name__, len(tasks))
        results = [{"error": "Redis unavailable; try again later"} for _ in tasks]
    return jsonify({"results": results})


def _job_args(pid: int, task: dict, value_key: str) -> list:
    """The leading arguments of every job /predict queues: pid, task id, image URL (the jobs that
    read the label config add its hash)."""
    return [pid, int(task["id"]), task["data"][value_key]]


def _segment(state: WebState, pid: int, tasks: list, xml: str, context: dict) -> dict:
    """An interactive /predict: one "interactive" job, waited for on a /predict waiting slot
    until PREDICT_BUDGET_S; the item of its mask (or an error item: LS shows no suggestion)."""
    config = parse_label_config(xml)
    if len(tasks) != 1:
        raise BadRequest(f"an interactive /predict holds one task, got {len(tasks)}")
    reason = task_error(tasks[0], config.value_key)
    if reason:
        raise BadRequest(reason)
    prompt = read_context(context, config)  # BadRequest (400) for a context we cannot use
    args = [*_job_args(pid, tasks[0], config.value_key), label_configs.put(runtime.get_store(), xml)]
    mv = runtime.model_version(pid)
    budget_s = state.settings.predict_budget_s
    job_id = queueing.enqueue("backend.jobs.interactive.segment_task", *args, prompt.to_json(), time.time() + budget_s,
                              queue="interactive", retries=0, timeout=max(60, int(budget_s) + 30),
                              meta={"project": pid, "task": args[1], "interactive": True})
    state.metrics.inc("jobs_enqueued interactive")
    items: list = [None]
    pending = {0: (job_id, "")}
    state.waiter.wait(pending, items, mv, state.waiter.deadline(), max_pause=POLL_CLICK_S)
    collect(pending, items, mv)
    if pending:
        return {"model_version": mv, "error": "the click was not answered within PREDICT_BUDGET_S "
                "(workers busy, or every /predict waiting slot taken)"}
    return items[0]


def _predict_tasks(state: WebState, pid: int, tasks: list, xml: str) -> list[dict]:
    """Items of a page of tasks: a "predict" job per valid task, waited for, then handed over."""
    config = parse_label_config(xml)
    value_key = config.value_key
    version = runtime.get_bank_store().version(pid)
    mv = runtime.model_version(pid, version)
    items: list[dict | None] = [None] * len(tasks)
    for i, task in enumerate(tasks):
        reason = task_error(task, value_key)
        if reason:
            items[i] = {"model_version": mv, "error": reason}
    todo = [i for i in range(len(tasks)) if items[i] is None]
    if not todo:
        return items
    # one task: it was opened in the editor, where clicks may follow (a page of tasks is not)
    warm = len(tasks) == 1 and bool(config.prompts)
    if version == EMPTY_VERSION:
        if warm:
            _warm(pid, _job_args(pid, tasks[todo[0]], value_key))
        return _empty_items(pid, tasks, todo, items, value_key, mv)
    config_hash = label_configs.put(runtime.get_store(), xml)
    deadline = state.waiter.deadline()
    pending = _enqueue_predictions(state, pid, [(i, [*_job_args(pid, tasks[i], value_key), config_hash])
                                                for i in todo], items, mv, warm)
    state.waiter.wait(pending, items, mv, deadline)
    collect(pending, items, mv)
    if pending:
        state.waiter.hand_over(pid, pending, items, mv)
    return items


def _enqueue_predictions(state: WebState, pid: int, jobs: list[tuple[int, list]], items: list, mv: str,
                         warm: bool) -> Pending:
    """Queue a predict job per (item index, job arguments); the ones queued, by item index."""
    pending: Pending = {}
    for n, (i, args) in enumerate(jobs):
        key = f"delivery:{pid}:{uuid.uuid4().hex}"
        try:
            job_id = queueing.enqueue("backend.jobs.predict.predict_task", *args, delivery_key=key,
                                      queue="predict", retries=1, **({"warm": True} if warm else {}),
                                      meta={"project": pid, "task": args[1]})
        except queueing.QueueUnavailable as exc:  # one timeout, not one per remaining task
            for j, _ in jobs[n:]:
                items[j] = {"model_version": mv, "error": f"queue unavailable, try again later ({exc})"}
            break
        pending[i] = (job_id, key)
        state.metrics.inc("jobs_enqueued predict")
    return pending


def _empty_items(pid: int, tasks: list, todo: list[int], items: list, value_key: str, mv: str) -> list[dict]:
    """Nothing to match against: a valid, empty prediction per task."""
    for i in todo:
        items[i] = {"result": [], "score": 0.0, "model_version": mv}
    # registered like a predict job's tasks, so the first reference's refresh updates them
    # (LS stores each item as a new prediction whose id we do not learn)
    runtime.get_registry().update(pid, {int(tasks[i]["id"]): {
        "image_url": tasks[i]["data"][value_key], "prediction_id": None, "model_version": mv,
        "result_hash": result_hash([])} for i in todo})
    return items


def _warm(pid: int, args: list) -> None:
    """Queue the SAM2 embedding of an opened task's image (pid, task id, image URL: no prediction
    job runs a model for it, the bank is empty); best effort."""
    try:
        queueing.enqueue("backend.jobs.interactive.warm_task", *args, queue="predict", retries=0,
                         meta={"project": pid, "task": args[1]})
    except queueing.QueueUnavailable as exc:
        log.info("project %s task %s: not warmed (%s)", pid, args[1], exc)
