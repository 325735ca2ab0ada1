"""The project's evaluation as a queued job (issue 13): leave-one-task-out scores of its own
annotations, calibrated per-class thresholds and the matching variant in use (backend.quality).

* schedule(pid, version)   after a bank change and on POST /evaluation: queues one evaluation on
                           the "evaluate" queue, the last in priority, so it never runs before a
                           waiting bank or predict job. Debounced: while one is queued, further
                           bank changes queue nothing (it reads the bank when it starts, so it
                           evaluates the latest one); a change after it started queues the next.
* evaluate_project(pid)    the job: annotated tasks read from Label Studio, their proposals from the
                           proposal cache (proposed once where missing), matched against fold banks
                           with every variant; stores the result with the thumbnails of its gallery,
                           and the tuning (variant, thresholds) beside the bank, where it is part of
                           model_version: a changed tuning queues a refresh of the predictions.
* status(pid)              GET /evaluation: the last result, "running" while one is queued or runs.

Importing this module loads no model (the web process schedules and reads); the job does.
"""
from __future__ import annotations

import base64
import logging
import time
import uuid

import cv2
import numpy as np

from backend import runtime
from backend import queueing
from backend.jobs.context import JobContext
from backend.storage.bank_store import FAITHFUL_VARIANT, Tuning
from backend.regions.label_config import LabelConfig, parse_label_config
from backend.settings import VARIANTS

log = logging.getLogger(__name__)

QUEUE = "evaluate"
PENDING_TTL_S = 6 * 3600      # a queued evaluation lost with its queue stops blocking new ones after this
THUMBNAIL_SIDE = 192          # longest side of a gallery thumbnail (JPEG, stored with the result)


def _pending(pid: int) -> str:
    return f"evaluate-pending:{int(pid)}"


def _running(pid: int) -> str:
    return f"evaluate-running:{int(pid)}"


def schedule(pid: int, version: str, on_demand: bool = False) -> str | None:
    """Queue an evaluation of the project unless one is queued already; its job id, or None."""
    store = runtime.get_store()
    job_id = f"evaluate-{int(pid)}-{version}" + (f"-{uuid.uuid4().hex[:8]}" if on_demand else "")
    if not store.setnx(_pending(pid), job_id, PENDING_TTL_S):
        return None
    try:
        return queueing.enqueue("backend.jobs.evaluation.evaluate_project", int(pid), queue=QUEUE, job_id=job_id,
                                meta={"project": int(pid)})
    except Exception:
        store.delete(_pending(pid))  # not queued: the next change must be able to try again
        raise


def status(pid: int) -> dict | None:
    """The last evaluation's result, with status "running" (and its job) while one is queued or
    running; None when there is none of either."""
    store = runtime.get_store()
    busy = store.get(_running(pid)) or store.get(_pending(pid))
    result = runtime.get_bank_store().evaluation(pid)
    if result is None and busy is None:
        return None
    out = dict(result or {"annotated_tasks": 0, "classes": {}})
    if busy is not None:
        out.update(status="running", job=busy.decode())
    return out


def _control_thresholds(config: LabelConfig) -> dict[str, float]:
    """label -> the strictest model_score_threshold a control of that label sets."""
    out: dict[str, float] = {}
    for control in config.controls:
        if control.score_threshold is not None:
            for label in control.labels:
                out[label] = min(out.get(label, 1.0), float(control.score_threshold))
    return out


def _thumbnail(array: np.ndarray) -> str | None:
    """Base64 JPEG of an RGB image, its longest side THUMBNAIL_SIDE at most."""
    h, w = array.shape[:2]
    scale = min(1.0, THUMBNAIL_SIDE / max(h, w, 1))
    small = cv2.resize(array, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(small, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 80])
    return base64.b64encode(data.tobytes()).decode() if ok else None


def evaluate_project(pid: int) -> dict:
    """The job (see the module docstring); a JSON-able summary."""
    store = runtime.get_store()
    job_id = (store.get(_pending(pid)) or b"").decode() or "evaluate"
    store.delete(_pending(pid))  # from now on a bank change queues the next evaluation
    store.set(_running(pid), job_id, runtime.get_settings().job_timeout_s)
    try:
        return _evaluate(pid)
    finally:
        store.delete(_running(pid))


def _evaluate(pid: int) -> dict:
    # the models: workers only
    from backend.jobs.bank import schedule_refresh
    from backend.jobs.inference import current_bank, match_cached, proposals, variant_options
    from backend.storage.bank_store import bank_version
    from backend.quality.evaluation import EvaluationSettings, evaluate_project
    from model.engine import match_pool

    t0 = time.monotonic()
    ctx = JobContext.for_project(pid)
    banks, s = ctx.banks, ctx.settings
    xml = banks.label_config(pid)
    if not xml:
        return {"status": "project was never set up"}
    config = parse_label_config(xml)
    bank = current_bank(ctx)
    version = bank_version(bank)
    tasks, sources, failed = _annotated_tasks(ctx, config)
    cache = ctx.proposal_cache

    def match(task_id: int, fold_bank, options):  # noqa: ANN001, ANN202 - evaluation.Matcher
        url, key = sources[task_id]
        found = cache.get(key)
        if found is None:  # evicted meanwhile: proposed again, through the cache
            found, key = proposals(ctx, ctx.fetcher.fetch(url, task_id=task_id))
        return match_cached(ctx, found, key, fold_bank, 0.0, options)

    pinned = s.variant
    names = list(VARIANTS) if pinned == "auto" else [pinned]
    settings = EvaluationSettings(default_threshold=s.score_threshold, control_thresholds=_control_thresholds(config),
                                  faithful=FAITHFUL_VARIANT if pinned == "auto" else pinned)
    with match_pool(max(1, s.refresh_threads)) as pool:
        result = evaluate_project(tasks, bank, match, {n: variant_options(ctx, n) for n in names}, settings,
                                  map_fn=pool.map)
    if pinned != "auto":
        result["variant_reason"] = f"pinned by NTT_VARIANT={pinned}"
    result.update(bank_version=version, failed_tasks=failed, finished_at=time.time())
    thumbnails = _thumbnails(ctx, {m["task_id"] for m in result.get("misses", [])}, sources)
    banks.set_evaluation(pid, result, thumbnails)
    tuning = Tuning(result["variant_in_use"], {k: float(v) for k, v in result["thresholds"].items() if v is not None})
    changed = banks.set_tuning(pid, tuning)
    refresh_job = schedule_refresh(pid, f"{version}-{tuning.version or 'ntt'}") if changed else None
    mean_ap = result["variants"][result["variant_in_use"]]["mean_ap"]
    log.info("project %s: evaluation of %d annotated tasks (%d failed) done in %.1f s: mean AP %s with variant %s, "
             "%d calibrated thresholds%s; report: GET /report?project=%s on this backend", pid, len(tasks), failed,
             time.monotonic() - t0, "n/a" if mean_ap is None else f"{mean_ap:.3f}", tuning.variant,
             len(tuning.thresholds), ", predictions refreshed" if changed else "", pid)
    return {"status": "done", "annotated_tasks": len(tasks), "failed_tasks": failed, "variant": tuning.variant,
            "mean_ap": mean_ap, "thresholds": dict(tuning.thresholds), "tuning_changed": changed,
            "refresh_job": refresh_job, "seconds": round(time.monotonic() - t0, 3)}


def _annotated_tasks(ctx: JobContext, config: LabelConfig) -> tuple[list, dict[int, tuple[str, str]], int]:
    """(AnnotatedTask list, task id -> (image URL, proposal-cache key), tasks that failed): the
    ground truth of a task is its newest submitted annotation; its bank groups are all of its
    annotations. A task whose image or proposals cannot be had is skipped (logged)."""
    from backend.jobs.inference import image_url, proposals
    from backend.quality.evaluation import AnnotatedTask, TruthRegion
    from backend.regions.annotations import annotation_references

    pid, fetcher = ctx.pid, ctx.fetcher
    tasks, sources, failed = [], {}, 0
    for task in ctx.ls_client.iter_tasks(pid):
        annotations = [a for a in task.get("annotations") or [] if isinstance(a.get("id"), int)]
        submitted = [a for a in annotations if not a.get("was_cancelled")]
        if not submitted or not isinstance(task.get("id"), int):
            continue
        try:
            url = image_url(task, config)
            image = fetcher.fetch(url, task_id=task["id"])
            _, key = proposals(ctx, image)
        except Exception as exc:  # noqa: BLE001 - one task must not stop the evaluation
            failed += 1
            log.warning("project %s task %s: left out of the evaluation: %s", pid, task.get("id"), exc)
            continue
        newest = max(submitted, key=lambda a: a["id"])
        refs = annotation_references(newest, config, (image.width, image.height),
                                     max_pixels=ctx.settings.max_image_pixels)
        truth = tuple(TruthRegion(r.label, box=r.box, mask=r.mask) for r in refs)
        tasks.append(AnnotatedTask(task["id"], (image.height, image.width), truth,
                                   frozenset(str(a["id"]) for a in annotations)))
        sources[task["id"]] = (url, key)
    return tasks, sources, failed


def _thumbnails(ctx: JobContext, task_ids: set, sources: dict[int, tuple[str, str]]) -> dict[str, str]:
    """{task id: base64 JPEG} of the gallery's tasks (images from the image cache)."""
    out = {}
    pid, fetcher = ctx.pid, ctx.fetcher
    for task_id in sorted(task_ids):
        try:
            data = _thumbnail(fetcher.fetch(sources[task_id][0], task_id=task_id).array)
        except Exception as exc:  # noqa: BLE001 - the report shows "(image unavailable)"
            log.warning("project %s task %s: no thumbnail for the report: %s", pid, task_id, exc)
            continue
        if data:
            out[str(task_id)] = data
    return out


def thumbnails(pid: int) -> dict[int, bytes]:
    """The last evaluation's thumbnails as render_report takes them."""
    return {int(k): base64.b64decode(v) for k, v in runtime.get_bank_store().thumbnails(pid).items()}
