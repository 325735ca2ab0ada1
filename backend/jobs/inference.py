"""From an image and the project's bank to a prediction item, through the proposal cache.

Proposals (SAM2 masks with their DINOv2 descriptors) depend on the image and the engine only, so
they are computed once per image and kept in the proposal cache; a prediction is a match of the
cached proposals against the bank in use (`match_item`). The bank in use is the project's, unless
another engine (other models or weights) built it (`current_bank`).
"""
from __future__ import annotations

import logging

from backend import queueing
from backend.errors import BadRequest
from backend.jobs.context import JobContext
from backend.ls.images import LoadedImage
from backend.regions.label_config import LabelConfig
from backend.regions.results import detections_to_regions, prediction_item
from backend.settings import VARIANTS
from backend.storage import label_configs
from backend.storage.bank_store import Tuning, bank_version
from backend.storage.proposal_cache import cache_key
from backend.storage.tasks_registry import TaskRecord
from model.bank import MemoryBank
from model.options import MethodOptions
from model.types import Detections, Proposals

log = logging.getLogger(__name__)

REBUILD_DEDUP_S = 600  # at most one engine-change rebuild queued per project in this window


def engine_basis(ctx: JobContext) -> dict:
    """The workers' engine as a bank's basis records it: model names and weights fingerprint."""
    return {"engine": ctx.engine.name, "weights": ctx.engine.fingerprint}


def basis(ctx: JobContext, xml: str) -> dict:
    """What the bank's references depend on: the engine (models and weights) and the label config."""
    return {**engine_basis(ctx), "config": label_configs.config_hash(xml)}


def image_url(task: dict, config: LabelConfig) -> str:
    """The task's image URL (data.<value key>); BadRequest when it has none."""
    url = (task.get("data") or {}).get(config.value_key)
    if not isinstance(url, str) or not url.strip():
        raise BadRequest(f"task {task.get('id')} has no image URL in data.{config.value_key}")
    return url


def current_bank(ctx: JobContext) -> MemoryBank:
    """The bank to predict with. References computed by another engine (the operator changed the
    models or their weights) cannot be matched: queue a rebuild and predict with an empty bank
    meanwhile."""
    pid = ctx.pid
    bank = ctx.banks.get(pid)
    stored = ctx.banks.basis(pid)
    engine = engine_basis(ctx) if len(bank) and stored else None
    if engine and {k: stored.get(k) for k in engine} != engine:
        log.warning("project %s: the bank was built with %s (weights %s), the workers run %s (weights %s); "
                    "rebuilding it", pid, stored.get("engine"), stored.get("weights"), *engine.values())
        if ctx.store.setnx(f"rebuild-pending:{pid}", "1", ttl=REBUILD_DEDUP_S):
            queueing.enqueue("backend.jobs.bank.rebuild_bank", pid, queue="bank", job_id=f"rebuild-{pid}-engine")
        return MemoryBank()
    return bank


def proposals(ctx: JobContext, image: LoadedImage) -> tuple[Proposals, str]:
    """(proposals, cache key): from the proposal cache, else computed once and cached."""
    engine, cache = ctx.engine, ctx.proposal_cache
    key = cache_key(image.sha256, engine.name, engine.fingerprint, engine.options)
    found = cache.get(key)
    if found is None:
        found = engine.propose(image.array, key=image.sha256)  # also keeps its SAM2 embedding for clicks
        try:
            cache.put(key, found)
        except OSError as exc:  # disk full, read-only: predict anyway, uncached
            log.warning("proposal cache: cannot store %s (%s); predicting without caching", key[:12], exc)
    return found, key


def cached_key(ctx: JobContext, record: TaskRecord) -> str | None:
    """The task's proposal-cache key when its proposals were computed by the running engine (same
    models, weights and options); None otherwise: those proposals are stale."""
    if not record.proposal_key or not record.image_sha256:
        return None
    engine = ctx.engine
    current = cache_key(record.image_sha256, engine.name, engine.fingerprint, engine.options)
    return record.proposal_key if record.proposal_key == current else None


def match_cached(ctx: JobContext, found: Proposals, key: str, bank: MemoryBank, threshold: float,
                 options: MethodOptions | None = None) -> Detections:
    """Detections of cached proposals (`key`) against `bank` (`options`: a variant, None: the
    engine's). The masks the match upsampled join those stored with the proposals for the next one."""
    cache = ctx.proposal_cache
    masks = cache.get_masks(key, found)
    result = ctx.engine.match_full(found, bank, score_threshold=threshold, masks=masks, options=options)
    if len(result.upsampled):
        masks.update(result.upsampled)
        try:
            cache.put_masks(key, masks)
        except OSError as exc:  # disk full, read-only: the next match upsamples them again
            log.warning("proposal cache: cannot store upsampled masks of %s (%s)", key[:12], exc)
    return result.detections


def variant_options(ctx: JobContext, name: str) -> MethodOptions | None:
    """MethodOptions of a variant name (None: the engine's own, also for a name no longer known)."""
    return ctx.settings.variant_options(name) if name in VARIANTS else None


def match_item(ctx: JobContext, found: Proposals, key: str, bank: MemoryBank, config: LabelConfig, mv: str,
               tuning: Tuning | None = None) -> dict:
    """Prediction item of one image. The match keeps the method's K and the laxest threshold (of
    the controls, the global one and the calibrated ones of `tuning`), with `tuning`'s variant;
    each control's threshold and max_detections cut its regions afterwards."""
    if len(bank) == 0:
        return prediction_item([], mv)
    s = ctx.settings
    tuning = tuning or Tuning()
    threshold = min([s.score_threshold if c.score_threshold is None else c.score_threshold
                     for c in config.controls] + list(tuning.thresholds.values()))
    detections = match_cached(ctx, found, key, bank, threshold, variant_options(ctx, tuning.variant))
    regions = detections_to_regions(detections, config, score_threshold=s.score_threshold,
                                    polygon_tolerance=s.polygon_tolerance, max_detections=s.max_detections,
                                    class_thresholds=tuning.thresholds)
    return prediction_item(regions, mv)


def warm(ctx: JobContext, task_id: int | None, url: str) -> bool:
    """Compute the SAM2 embedding of the task's image unless it is in memory (True if computed)."""
    image = ctx.fetcher.fetch(url, task_id=task_id)
    return ctx.engine.warm(image.array, key=image.sha256)


def predict_one(ctx: JobContext, task_id: int, url: str, config: LabelConfig, bank: MemoryBank,
                tuning: Tuning, warm_image: bool = False) -> tuple[dict, dict]:
    """(prediction item, registry fields) of one task; an empty bank runs no model at all.
    `warm_image`: keep the image's SAM2 embedding in memory for clicks (also when its proposals
    are cached)."""
    mv = ctx.model_version(bank_version(bank), tuning)
    if len(bank) == 0:
        if warm_image:
            warm(ctx, task_id, url)
        return prediction_item([], mv), {"image_url": url}
    image = ctx.fetcher.fetch(url, task_id=task_id)
    found, key = proposals(ctx, image)
    if warm_image:
        ctx.engine.warm(image.array, key=image.sha256)  # a no-op when propose just did it
    return (match_item(ctx, found, key, bank, config, mv, tuning),
            {"image_url": url, "image_sha256": image.sha256, "proposal_key": key})
