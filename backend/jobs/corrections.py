"""Negatives from corrections: the regions of our prediction that an annotation removed or relabelled.

Each becomes a negative reference of its class in the bank (model.corrections.find_negatives), so
the match stops proposing what the annotator rejected.
"""
from __future__ import annotations

import logging

from backend.delivery.post import our_prediction
from backend.jobs.context import JobContext
from backend.jobs.inference import image_url
from backend.regions.annotations import Reference, annotation_references
from backend.regions.label_config import LabelConfig
from model.corrections import Region, find_negatives

log = logging.getLogger(__name__)


def _regions_of(refs: list[Reference]) -> list[Region]:
    return [Region(r.label, mask=r.mask) if r.mask is not None else Region(r.label, box=r.box) for r in refs]


def correction_negatives(ctx: JobContext, task: dict, annotation: dict,
                         config: LabelConfig) -> list[tuple[str, str, object]]:
    """(class, neg_id, descriptor) of every region of our prediction on the task (read from Label
    Studio) that the submitted annotation removed or relabelled (model.corrections.find_negatives):
    the descriptor of the predicted region, as a reference's would be. [] for a skipped annotation
    or a task without our prediction."""
    if annotation.get("was_cancelled") or not isinstance(task.get("id"), int):
        return []
    prediction = our_prediction(ctx.ls_client, task["id"])
    if prediction is None or not isinstance(prediction.get("result"), list) or not prediction["result"]:
        return []
    image = ctx.fetcher.fetch(image_url(task, config), task_id=task["id"])
    size, max_pixels = (image.width, image.height), ctx.settings.max_image_pixels
    predicted = annotation_references({"id": f"p{prediction['id']}", "result": prediction["result"]}, config, size,
                                      max_pixels=max_pixels)
    annotated = annotation_references(annotation, config, size, max_pixels=max_pixels)
    negatives = find_negatives(_regions_of(predicted), _regions_of(annotated), (image.height, image.width))
    if not negatives:
        return []
    regions = [predicted[n.index] for n in negatives]
    descriptors = ctx.engine.encode_references(
        image.array, masks=[r.mask for r in regions], boxes=[r.box for r in regions])
    group = str(annotation["id"])
    log.info("project %s task %s: annotation %s corrected our prediction %s: %s", ctx.pid, task["id"], group,
             prediction["id"], ", ".join(f"{n.reason} {n.label}" for n in negatives))
    return [(n.label, f"{group}:neg:{r.ref_id}", d) for n, r, d in zip(negatives, regions, descriptors)
            if d is not None]
