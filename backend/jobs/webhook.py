"""apply_webhook: one Label Studio event, checked against Label Studio, as one atomic bank update.

A webhook is a hint, never a source of truth (anyone who reaches /webhook can send one): the
project's label config, the annotation and its task are read back from Label Studio with the
backend's own credentials, and ids of deleted annotations or tasks are acted on only once LS no
longer holds them. What LS does not hold changes nothing (logged). A changed bank queues a
refresh of the project's predictions and an evaluation.
"""
from __future__ import annotations

import logging
import time

from backend.errors import BadRequest, LabelStudioAPIError
from backend.jobs import evaluation as evaluation_job
from backend.jobs.bank import ls_project, rebuild, schedule_refresh, task_references
from backend.jobs.context import JobContext
from backend.jobs.corrections import correction_negatives
from backend.jobs.inference import basis
from backend.regions.label_config import parse_label_config
from model.bank import MemoryBank

log = logging.getLogger(__name__)

ANNOTATION_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED")
HANDLED_EVENTS = (*ANNOTATION_EVENTS, "ANNOTATIONS_CREATED", "ANNOTATIONS_DELETED", "TASKS_DELETED",
                  "PROJECT_UPDATED")


def _payload_ids(items: object) -> list[int]:
    """The integer ids of a webhook's list of {"id": ...} objects (anything else is skipped)."""
    ids = []
    for item in items if isinstance(items, list) else []:
        value = item.get("id") if isinstance(item, dict) else None
        if isinstance(value, int) and not isinstance(value, bool):
            ids.append(value)
        elif isinstance(value, str) and value.strip().isdigit():
            ids.append(int(value))
    return ids


def _ls_annotation(ctx: JobContext, annotation_id: int) -> tuple[dict, dict] | None:
    """(annotation, its task) as Label Studio holds them, or None (logged) when LS has no such
    annotation in this project."""
    client = ctx.ls_client
    try:
        annotation = client.get_annotation(annotation_id)
    except LabelStudioAPIError as exc:
        if exc.status != 404:
            raise
        annotation = None
    task_id = annotation.get("task") if isinstance(annotation, dict) else None
    tasks = client.get_tasks(ctx.pid, [task_id]) if isinstance(task_id, int) else []
    if not tasks:
        log.warning("project %s: Label Studio holds no annotation %s in this project; event ignored",
                    ctx.pid, annotation_id)
        return None
    return annotation, tasks[0]


def _deleted_annotations(ctx: JobContext, ids: list[int]) -> list[str]:
    """Those of `ids` whose references the bank holds and that Label Studio no longer has (404)."""
    bank = ctx.banks.get(ctx.pid)
    groups = {r.group for name in bank.classes for r in bank.refs(name) if r.group is not None}
    gone = []
    for annotation_id in sorted({str(i) for i in ids} & groups):
        try:
            ctx.ls_client.get_annotation(int(annotation_id))
        except LabelStudioAPIError as exc:
            if exc.status != 404:
                raise
            gone.append(annotation_id)
            continue
        log.warning("project %s: annotation %s is still in Label Studio; its references are kept",
                    ctx.pid, annotation_id)
    return gone


def _annotation_changed(ctx: JobContext, event: str, payload: dict, xml: str) -> dict:
    """ANNOTATION_CREATED / _UPDATED: the annotation's references, as LS holds it, replace its
    previous ones; so do the negatives it makes of our prediction on its task (its corrections)."""
    annotation_id = _payload_ids([payload.get("annotation")])
    if not annotation_id:
        raise BadRequest(f"{event} without an annotation object with an id")
    found = _ls_annotation(ctx, annotation_id[0])
    if found is None:
        return {"event": event, "annotation": annotation_id[0], "status": "annotation not in Label Studio"}
    annotation, task = found
    stored, new_basis = ctx.banks.basis(ctx.pid), basis(ctx, xml)
    if stored is not None and stored != new_basis:  # config or models changed: start over
        return {"event": event, "rebuild": rebuild(ctx)}
    group = str(annotation["id"])
    config = parse_label_config(xml)
    refs = task_references(ctx, task, [annotation], config)[group]
    negatives = correction_negatives(ctx, task, annotation, config)

    def replace_annotation(bank: MemoryBank) -> None:
        bank.remove_group(group)
        for label, ref_id, descriptor in refs:
            bank.add(label, ref_id, descriptor, group=group)
        for label, neg_id, descriptor in negatives:
            bank.add_negative(label, neg_id, descriptor, group=group)

    version = ctx.banks.update(ctx.pid, replace_annotation, basis=new_basis)
    return {"event": event, "annotation": annotation["id"], "references": len(refs), "negatives": len(negatives),
            "version": version}


def _annotations_deleted(ctx: JobContext, event: str, payload: dict) -> dict:
    ids = _payload_ids(payload.get("annotations"))
    gone = _deleted_annotations(ctx, ids)

    def remove_annotations(bank: MemoryBank) -> None:
        for group in gone:
            bank.remove_group(group)

    version = ctx.banks.update(ctx.pid, remove_annotations) if gone else ctx.banks.version(ctx.pid)
    return {"event": event, "annotations": len(ids), "removed": len(gone), "version": version}


def _tasks_deleted(ctx: JobContext, event: str, payload: dict) -> dict:
    """TASKS_DELETED: registered tasks that LS no longer lists in the project are forgotten, so
    refreshes stop posting to them."""
    pid, registry = ctx.pid, ctx.registry
    known = set(_payload_ids(payload.get("tasks"))) & set(registry.all(pid))
    present = {int(t["id"]) for t in ctx.ls_client.get_tasks(pid, known)} if known else set()
    if present:
        log.warning("project %s: tasks %s are still in Label Studio; not forgotten", pid, sorted(present)[:20])
    gone = known - present
    return {"event": event, "forgotten": registry.remove(pid, *gone) if gone else 0}


def _label_config(ctx: JobContext, project: dict) -> str:
    """The project's label config as LS gave it (stored beside the bank when it changed)."""
    xml = project.get("label_config") or ctx.banks.label_config(ctx.pid)
    if not xml:
        raise BadRequest(f"project {ctx.pid}: Label Studio gave no label config")
    if xml != ctx.banks.label_config(ctx.pid):
        ctx.banks.set_label_config(ctx.pid, xml)
    return xml


def apply_webhook(pid: int, event: str, payload: dict) -> dict:
    """Apply one Label Studio webhook to the project's bank; queue a refresh when it changed (see
    the module docstring)."""
    t0 = time.monotonic()
    if event not in HANDLED_EVENTS:
        return {"event": event, "status": "ignored"}
    ctx = JobContext.for_project(pid)
    project = ls_project(ctx)
    if project is None:
        return {"event": event, "status": "project not in Label Studio"}
    xml = _label_config(ctx, project)
    before = ctx.banks.version(pid)
    if event in ANNOTATION_EVENTS:
        result = _annotation_changed(ctx, event, payload, xml)
    elif event == "ANNOTATIONS_DELETED":
        result = _annotations_deleted(ctx, event, payload)
    elif event == "TASKS_DELETED":
        return _tasks_deleted(ctx, event, payload)
    elif event == "PROJECT_UPDATED" and ctx.banks.basis(pid) == basis(ctx, xml):
        return {"event": event, "status": "label config unchanged"}
    else:  # PROJECT_UPDATED with a new config, ANNOTATIONS_CREATED (a bulk import: no tasks in the payload)
        return {"event": event, "rebuild": rebuild(ctx)}
    if "version" not in result:  # the bank was not touched
        return result
    version = result["version"]
    result.update(changed=version != before, seconds=round(time.monotonic() - t0, 3))
    if version != before:
        result["refresh_job"] = schedule_refresh(pid, version)
        result["evaluation_job"] = evaluation_job.schedule(pid, version)
    return result
