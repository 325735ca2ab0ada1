"""rebuild_bank: a fresh bank from every annotated task of the project, read through the LS API.

Also the pieces the webhook job shares: the project's label config as Label Studio holds it, and
the references of a task's annotations (one image fetch per task).
"""
from __future__ import annotations

import logging
import time

from backend import queueing
from backend.errors import BadRequest, LabelStudioAPIError
from backend.jobs import evaluation as evaluation_job
from backend.jobs.context import JobContext, progress
from backend.jobs.inference import basis, image_url
from backend.ls.images import LoadedImage
from backend.regions.annotations import annotation_references, annotation_regions
from backend.regions.label_config import SUPPORTED_CONTROLS, LabelConfig, parse_label_config
from model.bank import MemoryBank

log = logging.getLogger(__name__)


def schedule_refresh(pid: int, version: str) -> str:
    """Queue the refresh of the project's predictions to bank (or tuning) `version`: one per version."""
    return queueing.enqueue("backend.jobs.refresh.refresh_project", pid, queue="predict",
                            job_id=f"refresh-{pid}-{version}", meta={"project": pid})


def ls_project(ctx: JobContext) -> dict | None:
    """The project as Label Studio holds it, or None (logged) when LS has no such project."""
    try:
        return ctx.ls_client.get_project(ctx.pid)
    except LabelStudioAPIError as exc:
        if exc.status != 404:
            raise
    log.warning("project %s: Label Studio has no such project; event ignored", ctx.pid)
    return None


def project_config(ctx: JobContext) -> str | None:
    """The project's label config as Label Studio holds it (stored beside the bank), or None
    (logged) when LS has no such project."""
    project = ls_project(ctx)
    if project is None:
        return None
    xml = project.get("label_config") or ctx.banks.label_config(ctx.pid)
    if not xml:
        raise BadRequest(f"project {ctx.pid} has no label config")
    ctx.banks.set_label_config(ctx.pid, xml)
    return xml


def _has_regions(annotation: dict) -> bool:
    return any(isinstance(r, dict) and r.get("type") in SUPPORTED_CONTROLS for r in annotation_regions(annotation))


def _encode_annotation(ctx: JobContext, image: LoadedImage, annotation: dict,
                       config: LabelConfig) -> list[tuple[str, str, object]]:
    """(class, ref_id, descriptor) of every usable region of one annotation."""
    refs = annotation_references(annotation, config, (image.width, image.height),
                                 max_pixels=ctx.settings.max_image_pixels)
    if not refs:
        return []
    descriptors = ctx.engine.encode_references(image.array, masks=[r.mask for r in refs], boxes=[r.box for r in refs])
    dropped = [r.ref_id for r, d in zip(refs, descriptors) if d is None]
    if dropped:
        log.warning("references %s cover no DINOv2 patch and are skipped", dropped)
    return [(r.label, r.ref_id, d) for r, d in zip(refs, descriptors) if d is not None]


def task_references(ctx: JobContext, task: dict, annotations: list[dict], config: LabelConfig) -> dict[str, list]:
    """annotation id (group) -> its references, for the annotations of one task (one image fetch)."""
    out: dict[str, list] = {str(a["id"]): [] for a in annotations}
    todo = [a for a in annotations if not a.get("was_cancelled") and _has_regions(a)]
    if todo:
        image = ctx.fetcher.fetch(image_url(task, config), task_id=task.get("id"))
        for annotation in todo:
            out[str(annotation["id"])] = _encode_annotation(ctx, image, annotation, config)
    return out


def _fresh_bank(ctx: JobContext, tasks: list[dict], config: LabelConfig) -> tuple[MemoryBank, dict, set, set]:
    """(bank of every annotated task's references, counts, annotation ids whose references could
    not be recomputed, every annotation id LS holds)."""
    fresh = MemoryBank()
    kept: set[str] = set()
    present: set[str] = set()
    counts = {"tasks": 0, "annotations": 0, "failed_tasks": 0}
    for task in tasks:
        anns = [a for a in task.get("annotations") or [] if "id" in a]
        if not anns:
            continue
        queueing.serve_interactive()
        counts["tasks"] += 1
        counts["annotations"] += len(anns)
        present.update(str(a["id"]) for a in anns)
        try:
            for group, refs in task_references(ctx, task, anns, config).items():
                for label, ref_id, descriptor in refs:
                    fresh.add(label, ref_id, descriptor, group=group)
        except Exception as exc:  # noqa: BLE001 - one task must not stop the rebuild
            counts["failed_tasks"] += 1
            kept.update(str(a["id"]) for a in anns)
            log.error("project %s task %s: references not recomputed, previous ones kept: %s",
                      ctx.pid, task.get("id"), exc)
        progress(counts["tasks"], None, stage="rebuild", references=len(fresh))
    return fresh, counts, kept, present


def rebuild_from(ctx: JobContext, xml: str, tasks: list[dict], refresh: bool = True) -> dict:
    """Replace the project's bank by one built from `tasks` (the project's listing); see rebuild_bank."""
    t0 = time.monotonic()
    pid, banks = ctx.pid, ctx.banks
    fresh, counts, kept, present = _fresh_bank(ctx, tasks, parse_label_config(xml))
    new_basis = basis(ctx, xml)
    same_basis = banks.basis(pid) == new_basis

    def swap(old: MemoryBank) -> MemoryBank:
        for name in old.classes:
            for ref in old.refs(name):
                if ref.group in kept and ref.ref_id not in fresh:
                    fresh.add(ref.class_name, ref.ref_id, ref.descriptor, ref.group)
        for neg in old.negatives() if same_basis else []:
            if neg.group in present:
                fresh.add_negative(neg.class_name, neg.ref_id, neg.descriptor, neg.group)
        return fresh

    before = banks.version(pid)
    version = banks.replace(pid, swap, basis=new_basis)
    result = {"tasks": counts["tasks"], "annotations": counts["annotations"], "references": len(fresh),
              "failed_tasks": counts["failed_tasks"], "version": version, "changed": version != before,
              "seconds": round(time.monotonic() - t0, 3)}
    log.info("project %s: bank rebuilt from %d annotated tasks: %d references, version %s (%d tasks failed)",
             pid, counts["tasks"], len(fresh), version, counts["failed_tasks"])
    if refresh and version != before:
        result["refresh_job"] = schedule_refresh(pid, version)
    if version != before:
        result["evaluation_job"] = evaluation_job.schedule(pid, version)
    return result


def rebuild(ctx: JobContext, refresh: bool = True) -> dict:
    """rebuild_bank with the job's context (also run by the webhook job)."""
    xml = project_config(ctx)
    if xml is None:
        return {"status": "project not in Label Studio"}
    return rebuild_from(ctx, xml, list(ctx.ls_client.iter_tasks(ctx.pid)), refresh)


def rebuild_bank(pid: int, refresh: bool = True) -> dict:
    """Replace the project's bank by one built from every annotated task (read through the LS API).

    A task whose image cannot be loaded keeps its annotations' previous references (logged), so a
    transient error never loses references. Negatives (corrections of our predictions) cannot be
    recomputed from annotations alone: those of annotations LS still holds are kept while the
    basis (config, models, weights) is unchanged, and dropped with it.
    """
    return rebuild(JobContext.for_project(pid), refresh)
