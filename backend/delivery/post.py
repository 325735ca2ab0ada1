"""Posting our predictions to Label Studio task by task (backend.delivery.bulk: many at once).

Jobs may run twice (retries, spool replays), so a post is idempotent: it PATCHes our existing
prediction of the task instead of adding another, and skips a result our own earlier post already
delivered under the same model_version.
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from backend.errors import LabelStudioAPIError
from backend.ls.ls_client import LabelStudioClient
from backend.storage.tasks_registry import TaskRecord, result_hash

if TYPE_CHECKING:
    from backend.jobs.context import JobContext

log = logging.getLogger(__name__)

OUR_VERSION_PREFIX = "ntt-"  # model_version prefix of the predictions this backend made


def our_prediction(client: LabelStudioClient, task_id: int) -> dict | None:
    """Our newest prediction of a task as Label Studio holds it (None without one)."""
    ours = [p for p in client.list_predictions(task_id) if isinstance(p, dict) and isinstance(p.get("id"), int)
            and str(p.get("model_version") or "").startswith(OUR_VERSION_PREFIX)]
    return max(ours, key=lambda p: p["id"]) if ours else None


def post(client: LabelStudioClient, task_id: int, item: dict, known_id: int | None,
         version_only: bool = False) -> int:
    """PATCH our prediction of the task when there is one, else create it; returns its id.
    `version_only`: prediction `known_id` holds this result already; only its model_version is sent."""
    prediction_id = known_id
    if prediction_id is None:  # e.g. one LS stored from a /predict answer, whose id we never learn
        ours = our_prediction(client, task_id)
        prediction_id = ours["id"] if ours else None
    if prediction_id is not None:
        try:
            if version_only:
                client.update_prediction(prediction_id, model_version=item["model_version"])
            else:
                client.update_prediction(prediction_id, result=item["result"], score=item["score"],
                                         model_version=item["model_version"], task_id=task_id)
            return prediction_id
        except LabelStudioAPIError as exc:
            if exc.status != 404:  # deleted in LS meanwhile: create a new one below
                raise
    created = client.create_prediction(task_id, item["result"], item["score"], item["model_version"])
    return int(created["id"])


def _post_many(ctx: "JobContext", todo: list[tuple[int, dict, TaskRecord | None, str]]) -> list[int | None]:
    """The prediction id of each (task id, item, record, result hash) posted, None where it failed
    (logged). Up to LS_POST_CONCURRENCY posts are in flight at once."""
    client = ctx.ls_client

    def post_one(job: tuple[int, dict, TaskRecord | None, str]) -> int | None:
        task_id, item, record, digest = job
        known = record.prediction_id if record else None
        same_result = record is not None and record.result_hash == digest
        try:
            return post(client, task_id, item, known, version_only=known is not None and same_result)
        except LabelStudioAPIError as exc:
            log.error("project %s task %s: posting the prediction to Label Studio failed: %s", ctx.pid, task_id, exc)
            return None

    workers = min(len(todo), ctx.settings.ls_post_concurrency)
    if workers > 1:  # LS answers one request at a time per connection: keep a few in flight
        with ThreadPoolExecutor(workers, thread_name_prefix="ls-post") as pool:
            return list(pool.map(post_one, todo))
    return [post_one(job) for job in todo]


def deliver(ctx: "JobContext", items: dict[int, dict], records: dict[int, TaskRecord] | None = None) -> dict:
    """Post items to Label Studio unless our own earlier post already holds that result under that
    model_version. (A result the web process returned is not trusted to be stored: LS does not
    store interactive answers, nor one that arrives after its timeout.) When our known prediction
    holds the result under an older model_version, only its version is PATCHed: LS treats a
    prediction of another version than the model's as stale and would add a second one.

    `records`: the registry records of the items' tasks when the caller holds them (else each is
    read here). One failing task is logged and counted; the others proceed. Registry records
    (which must exist) get the prediction id and delivered hash in one write.
    """
    counts = {"posted": 0, "skipped": 0, "failed": 0}
    todo: list[tuple[int, dict, TaskRecord | None, str]] = []
    for task_id, item in items.items():
        record = records.get(task_id) if records is not None else ctx.registry.get(ctx.pid, task_id)
        digest = result_hash(item["result"])
        if (record and record.prediction_id is not None and record.result_hash == digest
                and record.model_version == item["model_version"]):
            counts["skipped"] += 1
        else:
            todo.append((task_id, item, record, digest))
    delivered: dict[int, dict] = {}
    for (task_id, item, _, digest), prediction_id in zip(todo, _post_many(ctx, todo)):
        if prediction_id is None:
            counts["failed"] += 1
            continue
        delivered[task_id] = {"prediction_id": prediction_id, "result_hash": digest,
                              "model_version": item["model_version"]}
        counts["posted"] += 1
    if delivered:
        ctx.registry.update(ctx.pid, delivered)
    return counts
