"""predict_task: the unit of /predict work, with late delivery through the LS API.

The web process queues a task's id, its image URL and the hash of the project's label config
(backend.storage.label_configs), never the task itself; the job reads the config back by hash.
"""
from __future__ import annotations

from backend.delivery.post import deliver
from backend.errors import BadRequest, LabelStudioAPIError
from backend.jobs.context import JobContext
from backend.jobs.inference import current_bank, predict_one
from backend.regions.label_config import parse_label_config
from backend.storage import label_configs
from backend.storage.tasks_registry import result_hash


def checked_url(task_id: int, image_url: object) -> str:
    """The queued image URL; BadRequest when it is not a non-empty string."""
    if not isinstance(image_url, str) or not image_url.strip():
        raise BadRequest(f"task {task_id} has no image URL")
    return image_url


def predict_task(pid: int, task_id: int, image_url: str, config_hash: str, delivery_key: str | None = None,
                 warm: bool = False) -> dict:
    """Prediction item of one task; registers the task for later refreshes. `warm`: the task was
    opened in the editor: keep its image's SAM2 embedding for clicks (projects with smart tools).

    Late delivery: the web process waits for this job within its /predict budget, then claims
    `delivery_key` for "api". Here the job claims it for "web": whoever claims first wins. If the
    web won, it already answered LS without this result, so the job posts it through the LS API.
    """
    ctx = JobContext.for_project(pid)
    task_id = int(task_id)
    config = parse_label_config(label_configs.get(ctx.store, config_hash))
    url = checked_url(task_id, image_url)
    item, fields = predict_one(ctx, task_id, url, config, current_bank(ctx), ctx.tuning(),
                               warm_image=warm and bool(config.prompts))
    if delivery_key is None or ctx.store.claim(delivery_key, "web") == "web":
        # LS stores the item the web returns as a new prediction whose id we do not learn
        ctx.registry.update(pid, {task_id: {**fields, "prediction_id": None, "model_version": item["model_version"],
                                            "result_hash": result_hash(item["result"])}})
        return item
    ctx.registry.update(pid, {task_id: fields})
    counts = deliver(ctx, {task_id: item})
    if counts["failed"]:
        raise LabelStudioAPIError(f"project {pid} task {task_id}: late prediction could not be posted")
    return item
