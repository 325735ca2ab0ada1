"""train_project (START_TRAINING): rebuild the bank, then pre-annotate every unlabelled task.

The project's tasks are listed once: the rebuild reads the annotated ones, the pre-annotation the
others. Tasks are predicted one after the other (one model); their predictions are posted by
LS_POST_CONCURRENCY threads meanwhile, so waiting on Label Studio overlaps the next prediction.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

from backend import queueing
from backend.delivery.post import deliver
from backend.jobs.bank import project_config, rebuild_from, schedule_refresh
from backend.jobs.context import JobContext, progress
from backend.jobs.inference import current_bank, image_url, predict_one
from backend.regions.label_config import LabelConfig, parse_label_config
from backend.storage.bank_store import Tuning, bank_version
from model.bank import MemoryBank

log = logging.getLogger(__name__)

LOG_EVERY = 25  # a progress line every N tasks


def _labelled(task: dict) -> bool:
    return any(not a.get("was_cancelled") for a in task.get("annotations") or [])


def _predict_and_queue(ctx: JobContext, task: dict, config: LabelConfig, bank: MemoryBank, tuning: Tuning,
                       posting: ThreadPoolExecutor) -> Future:
    """Predict one task, record it, and queue its delivery on `posting`."""
    task_id = int(task["id"])
    item, fields = predict_one(ctx, task_id, image_url(task, config), config, bank, tuning)
    stored = {p.get("model_version") for p in task.get("predictions") or [] if isinstance(p, dict)}
    if "predictions" in task and item["model_version"] not in stored:
        fields = {**fields, "prediction_id": None, "result_hash": None}  # deleted in LS: post again
    ctx.registry.update(ctx.pid, {task_id: fields})
    return posting.submit(deliver, ctx, {task_id: item})


def _pre_annotate(ctx: JobContext, todo: list[dict], config: LabelConfig, bank: MemoryBank) -> dict:
    """Predict and post every task of `todo`; the counts of posted, unchanged and failed tasks."""
    pid, tuning = ctx.pid, ctx.tuning()
    counts = {"posted": 0, "skipped": 0, "failed": 0}
    workers = max(1, ctx.settings.ls_post_concurrency)
    in_flight: dict[Future, int] = {}

    def collect(futures: list[Future]) -> None:
        for future in futures:
            task_id = in_flight.pop(future)
            try:
                for key, value in future.result().items():
                    counts[key] += value
            except Exception as exc:  # noqa: BLE001 - one task must not stop the batch
                counts["failed"] += 1
                log.error("project %s task %s: posting the pre-annotation failed: %s", pid, task_id, exc)

    with ThreadPoolExecutor(workers, thread_name_prefix="ls-post") as posting:
        for n, task in enumerate(todo, 1):
            queueing.serve_interactive()
            try:
                in_flight[_predict_and_queue(ctx, task, config, bank, tuning, posting)] = int(task["id"])
            except Exception as exc:  # noqa: BLE001 - one task must not stop the batch
                counts["failed"] += 1
                log.error("project %s task %s: pre-annotation failed: %s", pid, task.get("id"), exc)
            if len(in_flight) >= 2 * workers:  # keep the posting queue short
                wait(list(in_flight), return_when=FIRST_COMPLETED)
            collect([f for f in list(in_flight) if f.done()])
            progress(n, len(todo), stage="pre-annotate", **counts)
            if n % LOG_EVERY == 0 and n < len(todo):
                log.info("project %s: pre-annotating, %d/%d tasks predicted (%d posted so far, %d unchanged, "
                         "%d failed)", pid, n, len(todo), counts["posted"], counts["skipped"], counts["failed"])
        wait(list(in_flight))
        collect(list(in_flight))
    return counts


def train_project(pid: int) -> dict:
    """START_TRAINING: rebuild the bank, then pre-annotate every unlabelled task through the LS API."""
    t0 = time.monotonic()
    ctx = JobContext.for_project(pid)
    xml = project_config(ctx)
    if xml is None:
        rebuilt = {"status": "project not in Label Studio"}
        return {"rebuild": rebuilt, "status": rebuilt["status"]}
    tasks = list(ctx.ls_client.iter_tasks(pid))
    rebuilt = rebuild_from(ctx, xml, tasks, refresh=False)
    bank = current_bank(ctx)
    todo = [t for t in tasks if not _labelled(t)]
    counts = _pre_annotate(ctx, todo, parse_label_config(xml), bank)
    progress(len(todo), len(todo), stage="pre-annotate", **counts)
    log.info("project %s: pre-annotated %d tasks (%d posted, %d unchanged, %d failed)",
             pid, len(todo), counts["posted"], counts["skipped"], counts["failed"])
    # tasks labelled meanwhile but predicted before still deserve the new bank
    refresh_job = schedule_refresh(pid, bank_version(bank)) if rebuilt["changed"] else None
    return {"rebuild": rebuilt, "tasks": len(todo), **counts, "refresh_job": refresh_job,
            "seconds": round(time.monotonic() - t0, 3)}
