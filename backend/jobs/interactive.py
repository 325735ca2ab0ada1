"""Jobs of the "interactive" side: a click or box -> one mask (segment_task), and the SAM2
embedding of an opened task's image computed ahead of the first click (warm_task).

The image is the task's, EXIF applied (the frame of LS's percents); its SAM2 embedding stays in
the engine's memory under the image file's sha256 (the key proposals use too), so a click on an
opened image runs only SAM2's prompt encoder and mask decoder.
"""
from __future__ import annotations

import time

from backend.jobs.context import JobContext
from backend.jobs.inference import warm
from backend.jobs.predict import checked_url
from backend.regions.interactive import Prompt
from backend.regions.label_config import parse_label_config
from backend.regions.results import mask_regions, prediction_item
from backend.storage import label_configs


def warm_task(pid: int, task_id: int, image_url: str) -> dict:
    """A task was opened in the editor of a project with smart tools: its image's SAM2 embedding is
    computed now."""
    ctx = JobContext.for_project(pid)
    return {"computed": warm(ctx, int(task_id), checked_url(task_id, image_url))}


def segment_task(pid: int, task_id: int, image_url: str, config_hash: str, prompt: dict,
                 expires_at: float | None = None) -> dict:
    """An interactive click/box (backend.regions.interactive.Prompt as JSON) -> the prediction item
    of its mask: regions of the prompt's brush or polygon control, labelled with the prompt's label.
    `expires_at` (epoch s): the /predict that asked stopped waiting then; later, nothing is done."""
    if expires_at is not None and time.time() > expires_at:
        return {"error": "the click waited longer than the /predict budget; nothing done"}
    ctx = JobContext.for_project(pid)
    config = parse_label_config(label_configs.get(ctx.store, config_hash))
    request = Prompt.from_json(prompt)
    control = next(c for c in config.controls if c.name == request.control)
    image = ctx.fetcher.fetch(checked_url(task_id, image_url), task_id=int(task_id))
    points, box = request.in_pixels(image.width, image.height)
    found = ctx.engine.segment(image.array, points, box, key=image.sha256)
    regions = mask_regions(found.mask, control, request.label, found.score, ctx.settings.polygon_tolerance)
    return prediction_item(regions, ctx.model_version())
