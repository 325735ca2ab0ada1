"""The work the queues run (RQ workers, or the embedded worker thread), as plain functions.

* apply_webhook   annotation/project/task events, checked against Label Studio -> one atomic bank
                  update -> refresh_project queued
* rebuild_bank    a fresh bank from every annotated task, read through the LS API
* train_project   START_TRAINING: rebuild, then pre-annotate every unlabelled task via the LS API
* predict_task    the unit of /predict work, with late delivery through the LS API; warms the image's
                  SAM2 embedding when a task is opened in a project with smart tools
* segment_task    an interactive click/box (queue "interactive") -> one mask region, answered to the
                  waiting /predict; warm_task: the SAM2 embedding of a task's image, computed ahead
* refresh_project after a bank change: re-score every processed task from its cached proposals
                  (no SAM2/DINOv2 run) and bring each one's prediction to the new model_version
                  (a PATCH of the version alone where the result did not change), or for many
                  tasks replace them all in bulk (backend.delivery.bulk)

Jobs may run twice (retries, spool replays): each one is idempotent, and every prediction goes to
Label Studio through `_deliver`, which PATCHes our existing prediction instead of adding another
and skips a result our own earlier post already delivered, or through a bulk refresh, which records
each import as it lands and never imports a version a re-posted task already holds (a worker killed
between an import and its record write can leave one task with two predictions of the new version).
Every job returns a small JSON-able dict. Jobs that work through many tasks (rebuild, train,
refresh) call `queueing.serve_interactive()` before each task, so a click waits for one task's work
at most.
"""
from __future__ import annotations

import hashlib
import logging
import math
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

import numpy as np

from backend import runtime
from backend.delivery import bulk as bulk_delivery
from backend.jobs import evaluation as evaluation_job
from backend import queueing
from backend.regions.annotations import Reference, regions_to_references
from backend.storage.bank_store import Tuning, bank_version
from backend.errors import BadRequest, LabelStudioAPIError
from backend.ls.images import LoadedImage
from backend.regions.interactive import Prompt
from backend.regions.label_config import SUPPORTED_CONTROLS, LabelConfig, parse_label_config
from backend.ls.ls_client import LabelStudioClient
from backend.storage.proposal_cache import cache_key
from backend.regions.results import detections_to_regions, mask_regions, prediction_item
from backend.storage.store import DELIVERY_TTL_S
from backend.settings import VARIANTS
from backend.storage.tasks_registry import TaskRecord, result_hash
from model.bank import MemoryBank
from model.corrections import Region, find_negatives
from model.engine import match_pool
from model.options import MethodOptions
from model.types import Detections, Proposals

log = logging.getLogger(__name__)

ANNOTATION_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED")
HANDLED_EVENTS = (*ANNOTATION_EVENTS, "ANNOTATIONS_CREATED", "ANNOTATIONS_DELETED", "TASKS_DELETED",
                  "PROJECT_UPDATED")
REFRESH_BATCH = 50           # tasks re-scored, posted and recorded per round (progress granularity)
LOG_EVERY = 25               # train_project logs a progress line every N tasks
OUR_VERSION_PREFIX = "ntt-"  # model_version prefix of the predictions this backend made
REBUILD_DEDUP_S = 600        # at most one engine-change rebuild queued per project in this window
MAX_COORDINATE = 1e4         # |percent| beyond which region coordinates are garbage (LS uses 0..100)


def _progress(done: int, total: int, **fields) -> None:
    """Progress in the running job's meta (GET /jobs); a no-op outside a job."""
    queueing.update_meta(done=done, total=total, **fields)


# ------------------------------------------------------------------------------------ helpers
def _engine_basis() -> dict:
    """The workers' engine as a bank's basis records it: model names and weights fingerprint."""
    return {"engine": runtime.engine_name(), "weights": runtime.get_engine().fingerprint}


def _basis(xml: str) -> dict:
    """What the bank's references depend on: the engine (models and weights) and the label config."""
    return {**_engine_basis(), "config": hashlib.sha256(xml.encode()).hexdigest()[:16]}


def _image_url(task: dict, config: LabelConfig) -> str:
    url = (task.get("data") or {}).get(config.value_key)
    if not isinstance(url, str) or not url.strip():
        raise BadRequest(f"task {task.get('id')} has no image URL in data.{config.value_key}")
    return url


def _current_bank(pid: int) -> MemoryBank:
    """The bank to predict with. References computed by another engine (the operator changed the
    models or their weights) cannot be matched: queue a rebuild and predict with an empty bank
    meanwhile."""
    bank = runtime.get_bank_store().get(pid)
    basis = runtime.get_bank_store().basis(pid)
    engine = _engine_basis() if len(bank) and basis else None
    if engine and {k: basis.get(k) for k in engine} != engine:
        log.warning("project %s: the bank was built with %s (weights %s), the workers run %s (weights %s); "
                    "rebuilding it", pid, basis.get("engine"), basis.get("weights"), *engine.values())
        if runtime.get_store().setnx(f"rebuild-pending:{pid}", "1", ttl=REBUILD_DEDUP_S):
            queueing.enqueue("backend.jobs.rebuild_bank", pid, queue="bank", job_id=f"rebuild-{pid}-engine")
        return MemoryBank()
    return bank


def _schedule_refresh(pid: int, version: str) -> str:
    return queueing.enqueue("backend.jobs.refresh_project", pid, queue="predict",
                            job_id=f"refresh-{pid}-{version}", meta={"project": pid})


def _proposals(image: LoadedImage) -> tuple[Proposals, str]:
    """(proposals, cache key): from the proposal cache, else computed once and cached."""
    engine = runtime.get_engine()
    cache = runtime.get_proposal_cache()
    key = cache_key(image.sha256, engine.name, engine.fingerprint, engine.options)
    proposals = cache.get(key)
    if proposals is None:
        proposals = engine.propose(image.array, key=image.sha256)  # also keeps its SAM2 embedding for clicks
        try:
            cache.put(key, proposals)
        except OSError as exc:  # disk full, read-only: predict anyway, uncached
            log.warning("proposal cache: cannot store %s (%s); predicting without caching", key[:12], exc)
    return proposals, key


def _cached_key(record: TaskRecord) -> str | None:
    """The task's proposal-cache key when its proposals were computed by the running engine (same
    models, weights and options); None otherwise: those proposals are stale."""
    if not record.proposal_key or not record.image_sha256:
        return None
    engine = runtime.get_engine()
    current = cache_key(record.image_sha256, engine.name, engine.fingerprint, engine.options)
    return record.proposal_key if record.proposal_key == current else None


def match_cached(proposals: Proposals, key: str, bank: MemoryBank, threshold: float,
                 options: MethodOptions | None = None) -> Detections:
    """Detections of cached proposals (`key`) against `bank` (`options`: a variant, None: the
    engine's). The masks the match upsampled join those stored with the proposals for the next one."""
    cache = runtime.get_proposal_cache()
    masks = cache.get_masks(key, proposals)
    result = runtime.get_engine().match_full(proposals, bank, score_threshold=threshold, masks=masks,
                                             options=options)
    if len(result.upsampled):
        masks.update(result.upsampled)
        try:
            cache.put_masks(key, masks)
        except OSError as exc:  # disk full, read-only: the next match upsamples them again
            log.warning("proposal cache: cannot store upsampled masks of %s (%s)", key[:12], exc)
    return result.detections


def variant_options(name: str) -> MethodOptions | None:
    """MethodOptions of a variant name (None: the engine's own, also for a name no longer known)."""
    return runtime.get_settings().variant_options(name) if name in VARIANTS else None


def _match_item(proposals: Proposals, key: str, bank: MemoryBank, config: LabelConfig, mv: str,
                tuning: Tuning | None = None) -> dict:
    """Prediction item of one image. The match keeps the method's K and the laxest threshold (of
    the controls, the global one and the calibrated ones of `tuning`), with `tuning`'s variant;
    each control's threshold and max_detections cut its regions afterwards."""
    if len(bank) == 0:
        return prediction_item([], mv)
    s = runtime.get_settings()
    tuning = tuning or Tuning()
    threshold = min([s.score_threshold if c.score_threshold is None else c.score_threshold
                     for c in config.controls] + list(tuning.thresholds.values()))
    detections = match_cached(proposals, key, bank, threshold, variant_options(tuning.variant))
    regions = detections_to_regions(detections, config, score_threshold=s.score_threshold,
                                    polygon_tolerance=s.polygon_tolerance, max_detections=s.max_detections,
                                    class_thresholds=tuning.thresholds)
    return prediction_item(regions, mv)


def _predict_one(pid: int, task_id: int, url: str, config: LabelConfig, bank: MemoryBank,
                 warm: bool = False) -> tuple[dict, dict]:
    """(prediction item, registry fields) of one task; an empty bank runs no model at all.
    `warm`: keep the image's SAM2 embedding in memory for clicks (also when its proposals are cached)."""
    tuning = runtime.get_tuning(pid)
    mv = runtime.model_version(pid, bank_version(bank), tuning)
    if len(bank) == 0:
        if warm:
            _warm(pid, task_id, url)
        return prediction_item([], mv), {"image_url": url}
    image = runtime.get_fetcher(pid).fetch(url, task_id=task_id)
    proposals, key = _proposals(image)
    if warm:
        runtime.get_engine().warm(image.array, key=image.sha256)  # a no-op when propose just did it
    return (_match_item(proposals, key, bank, config, mv, tuning),
            {"image_url": url, "image_sha256": image.sha256, "proposal_key": key})


def _find_ours(client: LabelStudioClient, task_id: int) -> int | None:
    """Id of our newest prediction on a task (one LS stored from a /predict answer)."""
    ours = [p for p in client.list_predictions(task_id)
            if str(p.get("model_version") or "").startswith(OUR_VERSION_PREFIX) and p.get("id") is not None]
    return max(int(p["id"]) for p in ours) if ours else None


def _post(client: LabelStudioClient, task_id: int, item: dict, known_id: int | None,
          version_only: bool = False) -> int:
    """PATCH our prediction of the task when there is one, else create it; returns its id.
    `version_only`: prediction `known_id` holds this result already; only its model_version is sent."""
    prediction_id = known_id if known_id is not None else _find_ours(client, task_id)
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


def _deliver(pid: int, items: dict[int, dict]) -> dict:
    """Post items to Label Studio unless our own earlier post already holds that result under that
    model_version. (A result the web process returned is not trusted to be stored: LS does not
    store interactive answers, nor one that arrives after its timeout.) When our known prediction
    holds the result under an older model_version, only its version is PATCHed: LS treats a
    prediction of another version than the model's as stale and would add a second one.

    Up to LS_POST_CONCURRENCY posts are in flight at once. One failing task is logged and
    counted; the others proceed. Registry records (which must exist) get the prediction id and
    delivered hash in one write.
    """
    registry = runtime.get_registry()
    client = runtime.get_ls_client(pid)
    counts = {"posted": 0, "skipped": 0, "failed": 0}
    todo: list[tuple[int, dict, TaskRecord | None, str]] = []
    for task_id, item in items.items():
        record = registry.get(pid, task_id)
        digest = result_hash(item["result"])
        if (record and record.prediction_id is not None and record.result_hash == digest
                and record.model_version == item["model_version"]):
            counts["skipped"] += 1
        else:
            todo.append((task_id, item, record, digest))

    def post(job: tuple[int, dict, TaskRecord | None, str]) -> int | None:
        task_id, item, record, digest = job
        known = record.prediction_id if record else None
        same_result = record is not None and record.result_hash == digest
        try:
            return _post(client, task_id, item, known, version_only=known is not None and same_result)
        except LabelStudioAPIError as exc:
            log.error("project %s task %s: posting the prediction to Label Studio failed: %s", pid, task_id, exc)
            return None

    workers = min(len(todo), runtime.get_settings().ls_post_concurrency)
    if workers > 1:  # LS answers one request at a time per connection: keep a few in flight
        with ThreadPoolExecutor(workers, thread_name_prefix="ls-post") as pool:
            ids = list(pool.map(post, todo))
    else:
        ids = [post(job) for job in todo]
    delivered: dict[int, dict] = {}
    for (task_id, item, _, digest), prediction_id in zip(todo, ids):
        if prediction_id is None:
            counts["failed"] += 1
            continue
        delivered[task_id] = {"prediction_id": prediction_id, "result_hash": digest,
                              "model_version": item["model_version"]}
        counts["posted"] += 1
    if delivered:
        registry.update(pid, delivered)
    return counts


def _regions(annotation: dict) -> list:
    result = annotation.get("result")
    return result if isinstance(result, list) else []


def _has_regions(annotation: dict) -> bool:
    return any(isinstance(r, dict) and r.get("type") in SUPPORTED_CONTROLS for r in _regions(annotation))


def _region_problem(region: object) -> str | None:
    """Why an annotation's `result` entry is unsafe to hand to the rasterisers (None if it is not).

    The entries come straight from the webhook payload. pycocotools' polygon rasteriser crashes the
    whole process (SIGSEGV) on NaN or huge coordinates, and a brush RLE is decoded into
    original_width x original_height pixels, so both are bounded here, before any decoding.
    """
    if not isinstance(region, dict):
        return "not a region object"
    if not all(isinstance(region.get(k), (str, type(None))) for k in ("type", "from_name", "to_name")):
        return "type, from_name and to_name must be strings"
    value = region.get("value")
    if not isinstance(value, dict):
        return None  # regions_to_references skips it as malformed
    try:
        numbers = [float(value[k]) for k in ("x", "y", "width", "height", "rotation") if value.get(k) is not None]
        if value.get("points") is not None:
            numbers += np.asarray(value["points"], dtype=np.float64).ravel().tolist()
        size = [float(region[k]) for k in ("original_width", "original_height") if region.get(k) is not None]
    except (TypeError, ValueError):
        return "coordinates or size are not numbers"
    if not all(math.isfinite(n) and abs(n) <= MAX_COORDINATE for n in numbers):
        return f"coordinates are not finite numbers within +-{MAX_COORDINATE:g} percent"
    if not all(math.isfinite(n) and n >= 0 for n in size) or math.prod(size) > runtime.get_settings().max_image_pixels:
        return "original_width x original_height is not a size within MAX_IMAGE_PIXELS"
    rle = value.get("rle")
    if rle is not None and not (isinstance(rle, list)
                                and all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b <= 255 for b in rle)):
        return "brush RLE is not a list of byte values"
    return None


def annotation_references(annotation: dict, config: LabelConfig, image_size: tuple[int, int]) -> list[Reference]:
    """References of one annotation's regions (image_size: W, H of the loaded image).

    Entries that are not region objects, or whose numbers could crash or exhaust the rasterisers,
    are skipped with a warning, like every other unusable region.
    """
    usable = []
    for n, region in enumerate(_regions(annotation)):
        problem = _region_problem(region)
        if problem:
            rid = region.get("id") if isinstance(region, dict) else None
            log.warning("skipping region %s of annotation %s: %s", rid or n, annotation.get("id"), problem)
            continue
        usable.append(region if region.get("id") else {**region, "id": str(n)})  # ids as before filtering
    return regions_to_references(usable, config, image_size=image_size, annotation_id=annotation["id"])


def _encode_annotation(image: LoadedImage, annotation: dict, config: LabelConfig) -> list[tuple[str, str, object]]:
    """(class, ref_id, descriptor) of every usable region of one annotation."""
    refs = annotation_references(annotation, config, (image.width, image.height))
    if not refs:
        return []
    descriptors = runtime.get_engine().encode_references(
        image.array, masks=[r.mask for r in refs], boxes=[r.box for r in refs])
    dropped = [r.ref_id for r, d in zip(refs, descriptors) if d is None]
    if dropped:
        log.warning("references %s cover no DINOv2 patch and are skipped", dropped)
    return [(r.label, r.ref_id, d) for r, d in zip(refs, descriptors) if d is not None]


def _task_references(pid: int, task: dict, annotations: list[dict], config: LabelConfig) -> dict[str, list]:
    """annotation id (group) -> its references, for the annotations of one task (one image fetch)."""
    out: dict[str, list] = {str(a["id"]): [] for a in annotations}
    todo = [a for a in annotations if not a.get("was_cancelled") and _has_regions(a)]
    if todo:
        image = runtime.get_fetcher(pid).fetch(_image_url(task, config), task_id=task.get("id"))
        for annotation in todo:
            out[str(annotation["id"])] = _encode_annotation(image, annotation, config)
    return out


def _labelled(task: dict) -> bool:
    return any(not a.get("was_cancelled") for a in task.get("annotations") or [])


def _ls_project(pid: int, client: LabelStudioClient) -> dict | None:
    """The project as Label Studio holds it, or None (logged) when LS has no such project."""
    try:
        return client.get_project(pid)
    except LabelStudioAPIError as exc:
        if exc.status != 404:
            raise
    log.warning("project %s: Label Studio has no such project; event ignored", pid)
    return None


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


def _ls_annotation(pid: int, client: LabelStudioClient, annotation_id: int) -> tuple[dict, dict] | None:
    """(annotation, its task) as Label Studio holds them, or None (logged) when LS has no such
    annotation in this project."""
    try:
        annotation = client.get_annotation(annotation_id)
    except LabelStudioAPIError as exc:
        if exc.status != 404:
            raise
        annotation = None
    task_id = annotation.get("task") if isinstance(annotation, dict) else None
    tasks = client.get_tasks(pid, [task_id]) if isinstance(task_id, int) else []
    if not tasks:
        log.warning("project %s: Label Studio holds no annotation %s in this project; event ignored",
                    pid, annotation_id)
        return None
    return annotation, tasks[0]


def _bank_groups(pid: int) -> set[str]:
    """The annotation ids (groups) the project's bank holds references of."""
    bank = runtime.get_bank_store().get(pid)
    return {r.group for name in bank.classes for r in bank.refs(name) if r.group is not None}


def _deleted_annotations(pid: int, client: LabelStudioClient, ids: list[int]) -> list[str]:
    """Those of `ids` whose references the bank holds and that Label Studio no longer has (404)."""
    gone = []
    for annotation_id in sorted({str(i) for i in ids} & _bank_groups(pid)):
        try:
            client.get_annotation(int(annotation_id))
        except LabelStudioAPIError as exc:
            if exc.status != 404:
                raise
            gone.append(annotation_id)
            continue
        log.warning("project %s: annotation %s is still in Label Studio; its references are kept",
                    pid, annotation_id)
    return gone


def _our_prediction(client: LabelStudioClient, task_id: int) -> dict | None:
    """Our newest prediction of a task as Label Studio holds it (None without one)."""
    ours = [p for p in client.list_predictions(task_id) if isinstance(p, dict) and isinstance(p.get("id"), int)
            and str(p.get("model_version") or "").startswith(OUR_VERSION_PREFIX)]
    return max(ours, key=lambda p: p["id"]) if ours else None


def _regions_of(refs: list[Reference]) -> list[Region]:
    return [Region(r.label, mask=r.mask) if r.mask is not None else Region(r.label, box=r.box) for r in refs]


def correction_negatives(pid: int, task: dict, annotation: dict, config: LabelConfig,
                         client: LabelStudioClient) -> list[tuple[str, str, object]]:
    """(class, neg_id, descriptor) of every region of our prediction on the task (read from Label
    Studio) that the submitted annotation removed or relabelled (model.corrections.find_negatives):
    the descriptor of the predicted region, as a reference's would be. [] for a skipped annotation
    or a task without our prediction."""
    if annotation.get("was_cancelled") or not isinstance(task.get("id"), int):
        return []
    prediction = _our_prediction(client, task["id"])
    if prediction is None or not isinstance(prediction.get("result"), list) or not prediction["result"]:
        return []
    image = runtime.get_fetcher(pid).fetch(_image_url(task, config), task_id=task["id"])
    size = (image.width, image.height)
    predicted = annotation_references({"id": f"p{prediction['id']}", "result": prediction["result"]}, config, size)
    annotated = annotation_references(annotation, config, size)
    negatives = find_negatives(_regions_of(predicted), _regions_of(annotated), (image.height, image.width))
    if not negatives:
        return []
    regions = [predicted[n.index] for n in negatives]
    descriptors = runtime.get_engine().encode_references(
        image.array, masks=[r.mask for r in regions], boxes=[r.box for r in regions])
    group = str(annotation["id"])
    log.info("project %s task %s: annotation %s corrected our prediction %s: %s", pid, task["id"], group,
             prediction["id"], ", ".join(f"{n.reason} {n.label}" for n in negatives))
    return [(n.label, f"{group}:neg:{r.ref_id}", d) for n, r, d in zip(negatives, regions, descriptors)
            if d is not None]


def _annotation_changed(pid: int, event: str, payload: dict, xml: str, client: LabelStudioClient) -> dict:
    """ANNOTATION_CREATED / _UPDATED: the annotation's references, as LS holds it, replace its
    previous ones; so do the negatives it makes of our prediction on its task (its corrections)."""
    annotation_id = _payload_ids([payload.get("annotation")])
    if not annotation_id:
        raise BadRequest(f"{event} without an annotation object with an id")
    found = _ls_annotation(pid, client, annotation_id[0])
    if found is None:
        return {"event": event, "annotation": annotation_id[0], "status": "annotation not in Label Studio"}
    annotation, task = found
    banks = runtime.get_bank_store()
    stored = banks.basis(pid)
    if stored is not None and stored != _basis(xml):  # config or models changed: start over
        return {"event": event, "rebuild": rebuild_bank(pid)}
    group = str(annotation["id"])
    config = parse_label_config(xml)
    refs = _task_references(pid, task, [annotation], config)[group]
    negatives = correction_negatives(pid, task, annotation, config, client)

    def replace_annotation(bank: MemoryBank) -> None:
        bank.remove_group(group)
        for label, ref_id, descriptor in refs:
            bank.add(label, ref_id, descriptor, group=group)
        for label, neg_id, descriptor in negatives:
            bank.add_negative(label, neg_id, descriptor, group=group)

    version = banks.update(pid, replace_annotation, basis=_basis(xml))
    return {"event": event, "annotation": annotation["id"], "references": len(refs), "negatives": len(negatives),
            "version": version}


def _annotations_deleted(pid: int, event: str, payload: dict, client: LabelStudioClient) -> dict:
    ids = _payload_ids(payload.get("annotations"))
    gone = _deleted_annotations(pid, client, ids)

    def remove_annotations(bank: MemoryBank) -> None:
        for group in gone:
            bank.remove_group(group)

    banks = runtime.get_bank_store()
    version = banks.update(pid, remove_annotations) if gone else banks.version(pid)
    return {"event": event, "annotations": len(ids), "removed": len(gone), "version": version}


def _tasks_deleted(pid: int, event: str, payload: dict, client: LabelStudioClient) -> dict:
    """TASKS_DELETED: registered tasks that LS no longer lists in the project are forgotten, so
    refreshes stop posting to them."""
    registry = runtime.get_registry()
    known = set(_payload_ids(payload.get("tasks"))) & set(registry.all(pid))
    present = {int(t["id"]) for t in client.get_tasks(pid, known)} if known else set()
    if present:
        log.warning("project %s: tasks %s are still in Label Studio; not forgotten", pid, sorted(present)[:20])
    gone = known - present
    return {"event": event, "forgotten": registry.remove(pid, *gone) if gone else 0}


# ------------------------------------------------------------------------------------ jobs
def apply_webhook(pid: int, event: str, payload: dict) -> dict:
    """Apply one Label Studio webhook to the project's bank; queue a refresh when it changed.

    A webhook is a hint, never a source of truth (anyone who reaches /webhook can send one): the
    project's label config, the annotation and its task are read back from Label Studio with the
    backend's own credentials, and ids of deleted annotations or tasks are acted on only once LS no
    longer holds them. What LS does not hold changes nothing (logged).
    """
    t0 = time.monotonic()
    if event not in HANDLED_EVENTS:
        return {"event": event, "status": "ignored"}
    client = runtime.get_ls_client(pid)
    project = _ls_project(pid, client)
    if project is None:
        return {"event": event, "status": "project not in Label Studio"}
    banks = runtime.get_bank_store()
    xml = project.get("label_config") or banks.label_config(pid)
    if not xml:
        raise BadRequest(f"project {pid}: Label Studio gave no label config")
    if xml != banks.label_config(pid):
        banks.set_label_config(pid, xml)
    before = banks.version(pid)

    if event in ANNOTATION_EVENTS:
        result = _annotation_changed(pid, event, payload, xml, client)
    elif event == "ANNOTATIONS_DELETED":
        result = _annotations_deleted(pid, event, payload, client)
    elif event == "TASKS_DELETED":
        return _tasks_deleted(pid, event, payload, client)
    elif event == "PROJECT_UPDATED" and banks.basis(pid) == _basis(xml):
        return {"event": event, "status": "label config unchanged"}
    else:  # PROJECT_UPDATED with a new config, ANNOTATIONS_CREATED (a bulk import: no tasks in the payload)
        return {"event": event, "rebuild": rebuild_bank(pid)}
    if "version" not in result:  # the bank was not touched
        return result
    version = result["version"]
    result.update(changed=version != before, seconds=round(time.monotonic() - t0, 3))
    if version != before:
        result["refresh_job"] = _schedule_refresh(pid, version)
        result["evaluation_job"] = evaluation_job.schedule(pid, version)
    return result


def rebuild_bank(pid: int, refresh: bool = True) -> dict:
    """Replace the project's bank by one built from every annotated task (read through the LS API).

    A task whose image cannot be loaded keeps its annotations' previous references (logged), so a
    transient error never loses references. Negatives (corrections of our predictions) cannot be
    recomputed from annotations alone: those of annotations LS still holds are kept while the
    basis (config, models, weights) is unchanged, and dropped with it.
    """
    t0 = time.monotonic()
    banks = runtime.get_bank_store()
    client = runtime.get_ls_client(pid)
    project = _ls_project(pid, client)
    if project is None:
        return {"status": "project not in Label Studio"}
    xml = project.get("label_config") or banks.label_config(pid)
    if not xml:
        raise BadRequest(f"project {pid} has no label config")
    banks.set_label_config(pid, xml)
    config = parse_label_config(xml)
    fresh = MemoryBank()
    kept: set[str] = set()
    present: set[str] = set()  # every annotation LS holds
    tasks = annotations = failed = 0
    for task in client.iter_tasks(pid):
        anns = [a for a in task.get("annotations") or [] if "id" in a]
        if not anns:
            continue
        queueing.serve_interactive()
        tasks += 1
        annotations += len(anns)
        present.update(str(a["id"]) for a in anns)
        try:
            for group, refs in _task_references(pid, task, anns, config).items():
                for label, ref_id, descriptor in refs:
                    fresh.add(label, ref_id, descriptor, group=group)
        except Exception as exc:  # noqa: BLE001 - one task must not stop the rebuild
            failed += 1
            kept.update(str(a["id"]) for a in anns)
            log.error("project %s task %s: references not recomputed, previous ones kept: %s",
                      pid, task.get("id"), exc)
        _progress(tasks, None, stage="rebuild", references=len(fresh))

    same_basis = banks.basis(pid) == _basis(xml)

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
    version = banks.replace(pid, swap, basis=_basis(xml))
    result = {"tasks": tasks, "annotations": annotations, "references": len(fresh), "failed_tasks": failed,
              "version": version, "changed": version != before, "seconds": round(time.monotonic() - t0, 3)}
    log.info("project %s: bank rebuilt from %d annotated tasks: %d references, version %s (%d tasks failed)",
             pid, tasks, len(fresh), version, failed)
    if refresh and version != before:
        result["refresh_job"] = _schedule_refresh(pid, version)
    if version != before:
        result["evaluation_job"] = evaluation_job.schedule(pid, version)
    return result


def train_project(pid: int) -> dict:
    """START_TRAINING: rebuild the bank, then pre-annotate every unlabelled task through the LS API.

    Tasks are predicted one after the other (one model); their predictions are posted by
    LS_POST_CONCURRENCY threads meanwhile, so waiting on Label Studio overlaps the next prediction.
    """
    t0 = time.monotonic()
    rebuilt = rebuild_bank(pid, refresh=False)
    if "status" in rebuilt:
        return {"rebuild": rebuilt, "status": rebuilt["status"]}
    client = runtime.get_ls_client(pid)
    registry = runtime.get_registry()
    config = parse_label_config(runtime.get_bank_store().label_config(pid))
    bank = _current_bank(pid)
    todo = [t for t in client.iter_tasks(pid) if not _labelled(t)]
    counts = {"posted": 0, "skipped": 0, "failed": 0}
    workers = max(1, runtime.get_settings().ls_post_concurrency)
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
            task_id = int(task["id"])
            try:
                item, fields = _predict_one(pid, task_id, _image_url(task, config), config, bank)
                stored = {p.get("model_version") for p in task.get("predictions") or [] if isinstance(p, dict)}
                if "predictions" in task and item["model_version"] not in stored:
                    fields = {**fields, "prediction_id": None, "result_hash": None}  # deleted in LS: post again
                registry.update(pid, {task_id: fields})
                in_flight[posting.submit(_deliver, pid, {task_id: item})] = task_id
            except Exception as exc:  # noqa: BLE001 - one task must not stop the batch
                counts["failed"] += 1
                log.error("project %s task %s: pre-annotation failed: %s", pid, task_id, exc)
            if len(in_flight) >= 2 * workers:  # keep the posting queue short
                wait(list(in_flight), return_when=FIRST_COMPLETED)
            collect([f for f in list(in_flight) if f.done()])
            _progress(n, len(todo), stage="pre-annotate", **counts)
            if n % LOG_EVERY == 0 and n < len(todo):
                log.info("project %s: pre-annotating, %d/%d tasks predicted (%d posted so far, %d unchanged, "
                         "%d failed)", pid, n, len(todo), counts["posted"], counts["skipped"], counts["failed"])
        wait(list(in_flight))
        collect(list(in_flight))
    _progress(len(todo), len(todo), stage="pre-annotate", **counts)
    log.info("project %s: pre-annotated %d tasks (%d posted, %d unchanged, %d failed)",
             pid, len(todo), counts["posted"], counts["skipped"], counts["failed"])
    # tasks labelled meanwhile but predicted before still deserve the new bank
    refresh_job = _schedule_refresh(pid, bank_version(bank)) if rebuilt["changed"] else None
    return {"rebuild": rebuilt, "tasks": len(todo), **counts, "refresh_job": refresh_job,
            "seconds": round(time.monotonic() - t0, 3)}


def _warm(pid: int, task_id: int | None, url: str) -> bool:
    """Compute the SAM2 embedding of the task's image unless it is in memory (True if computed)."""
    image = runtime.get_fetcher(pid).fetch(url, task_id=task_id)
    return runtime.get_engine().warm(image.array, key=image.sha256)


def warm_task(pid: int, task: dict, label_config: str) -> dict:
    """A task was opened in the editor of a project with smart tools: its image's SAM2 embedding is
    computed now, so the first click runs only SAM2's prompt encoder and mask decoder."""
    config = parse_label_config(label_config)
    return {"computed": _warm(pid, task.get("id"), _image_url(task, config))}


def segment_task(pid: int, task: dict, label_config: str, prompt: dict, expires_at: float | None = None) -> dict:
    """An interactive click/box (backend.regions.interactive.Prompt as JSON) -> the prediction item of its
    mask: regions of the prompt's brush or polygon control, labelled with the prompt's label.

    The image is the task's, EXIF applied (the frame of LS's percents); its SAM2 embedding comes
    from the engine's memory under the image file's sha256 (the key proposals and warm_task use),
    so a click on an opened image runs only SAM2's prompt encoder and mask decoder.
    `expires_at` (epoch s): the /predict that asked stopped waiting then; later, nothing is done.
    """
    if expires_at is not None and time.time() > expires_at:
        return {"error": "the click waited longer than the /predict budget; nothing done"}
    config = parse_label_config(label_config)
    request = Prompt.from_json(prompt)
    control = next(c for c in config.controls if c.name == request.control)
    image = runtime.get_fetcher(pid).fetch(_image_url(task, config), task_id=task.get("id"))
    points, box = request.in_pixels(image.width, image.height)
    found = runtime.get_engine().segment(image.array, points, box, key=image.sha256)
    regions = mask_regions(found.mask, control, request.label, found.score,
                           runtime.get_settings().polygon_tolerance)
    return prediction_item(regions, runtime.model_version(pid))


def predict_task(pid: int, task: dict, label_config: str, delivery_key: str | None = None,
                 warm: bool = False) -> dict:
    """Prediction item of one task; registers the task for later refreshes.

    Late delivery: the web process waits for this job within its /predict budget, then claims
    `delivery_key` for "api". Here the job claims it for "web": whoever claims first wins. If the
    web won, it already answered LS without this result, so the job posts it through the LS API.
    """
    task_id = int(task["id"])
    config = parse_label_config(label_config)
    url = _image_url(task, config)
    item, fields = _predict_one(pid, task_id, url, config, _current_bank(pid), warm=warm and bool(config.prompts))
    registry = runtime.get_registry()
    if delivery_key is None or runtime.get_store().claim(delivery_key, "web") == "web":
        # LS stores the item the web returns as a new prediction whose id we do not learn
        registry.update(pid, {task_id: {**fields, "prediction_id": None, "model_version": item["model_version"],
                                        "result_hash": result_hash(item["result"])}})
        return item
    registry.update(pid, {task_id: fields})
    counts = _deliver(pid, {task_id: item})
    if counts["failed"]:
        raise LabelStudioAPIError(f"project {pid} task {task_id}: late prediction could not be posted")
    return item


def rescore_cached(pid: int, bank: MemoryBank, records: dict[int, TaskRecord] | None = None,
                   config: LabelConfig | None = None, tuning: Tuning | None = None) -> list[tuple[int, dict, bool]]:
    """(task id, new item, changed) for every registered task whose proposals are cached, in
    `records` order.

    No model runs: cached proposals are re-matched against `bank`, REFRESH_THREADS tasks at once
    (model.engine.match_pool; cache reads, torch, numpy and OpenCV release the GIL). `changed`
    compares the result with the one last delivered. With an empty bank every task gets an empty
    result. `tuning`: the project's tuning in force unless given.
    """
    if config is None:
        xml = runtime.get_bank_store().label_config(pid)
        if not xml:
            return []
        config = parse_label_config(xml)
    if records is None:
        records = runtime.get_registry().all(pid)
    tuning = tuning if tuning is not None else runtime.get_tuning(pid)
    mv = runtime.model_version(pid, bank_version(bank), tuning)
    cache = runtime.get_proposal_cache()

    def rescore(task: tuple[int, TaskRecord]) -> tuple[int, dict, bool] | None:
        queueing.serve_interactive()
        task_id, record = task
        if len(bank) == 0:
            item = prediction_item([], mv)
        else:
            key = _cached_key(record)
            proposals = cache.get(key) if key else None
            if proposals is None:
                return None
            item = _match_item(proposals, key, bank, config, mv, tuning)
        return task_id, item, result_hash(item["result"]) != record.result_hash

    threads = min(len(records), runtime.get_settings().refresh_threads)
    if threads > 1:
        with match_pool(threads) as pool:
            out = list(pool.map(rescore, records.items()))
    else:
        out = [rescore(task) for task in records.items()]
    return [r for r in out if r is not None]


def _enqueue_predictions(pid: int, records: dict[int, TaskRecord], xml: str, value_key: str, version: str) -> int:
    """Queue predict jobs (delivering through the LS API) for registered tasks without cached
    proposals; at most once per task and bank version."""
    store = runtime.get_store()
    queued = 0
    for task_id, record in records.items():
        key = f"delivery:{pid}:refresh-{task_id}-{version}"
        if not store.setnx(key, "api", DELIVERY_TTL_S):  # pre-claimed: the job posts to LS itself
            continue
        task = {"id": task_id, "data": {value_key: record.image_url}}
        try:
            queueing.enqueue("backend.jobs.predict_task", pid, task, xml, key, queue="predict",
                             job_id=f"predict-{pid}-{task_id}-{version}", meta={"project": pid, "task": task_id})
        except Exception:
            store.delete(key)  # not queued: the next refresh must be able to try again
            raise
        queued += 1
    return queued


def refresh_project(pid: int) -> dict:
    """Re-label every processed task of the project with the current bank (see module docstring).

    Tasks already delivered with the current model_version are skipped; the rest are re-scored from
    cached proposals in batches and posted (PATCH per task; the version alone where the result did
    not change, or LS would treat the old version as stale and add a second prediction), or, for
    many tasks, all of them replaced in bulk (backend.delivery.bulk). Tasks without cached
    proposals get a predict job. Stops early when the bank or its tuning changes again (that change
    queued its own refresh).
    """
    t0 = time.monotonic()
    xml = runtime.get_bank_store().label_config(pid)
    if not xml:
        return {"status": "project was never set up", "seconds": 0.0}
    config = parse_label_config(xml)
    bank = _current_bank(pid)
    version = bank_version(bank)
    tuning = runtime.get_tuning(pid)
    mv = runtime.model_version(pid, version, tuning)
    registered = runtime.get_registry().all(pid)
    stale = {tid: rec for tid, rec in sorted(registered.items()) if rec.model_version != mv}
    counts = {"tasks": len(registered), "current": len(registered) - len(stale), "rescored": 0, "changed": 0,
              "posted": 0, "failed": 0, "enqueued": 0}
    cache = runtime.get_proposal_cache()
    cached = {tid: rec for tid, rec in stale.items() if (key := _cached_key(rec)) and cache.contains(key)}
    retire = bulk_delivery.plan(pid, cached, mv, OUR_VERSION_PREFIX) if len(bank) else None
    bulk_ok = retire is not None
    importer = bulk_delivery.Importer(pid)

    def post_each(items: dict[int, dict]) -> None:
        if items:
            delivered = _deliver(pid, items)
            counts["posted"] += delivered["posted"]
            counts["failed"] += delivered["failed"]

    def give_up(why: str) -> bool:
        """Leave bulk mode: what was collected but not imported goes task by task. A failed import
        may still have landed in LS, so those tasks forget the prediction id they knew: each post
        then updates our newest prediction there (the imported one if it exists)."""
        log.warning("project %s: %s; posting task by task", pid, why)
        items = importer.drain()
        if items:
            runtime.get_registry().update(pid, {tid: {"prediction_id": None} for tid in items})
        post_each(items)
        return False

    ids = list(stale)
    superseded = False
    for start in range(0, len(ids), REFRESH_BATCH):
        batch = {tid: stale[tid] for tid in ids[start:start + REFRESH_BATCH]}
        rescored = rescore_cached(pid, bank, records=batch, config=config, tuning=tuning)
        counts["rescored"] += len(rescored)
        changed = {tid: item for tid, item, is_changed in rescored if is_changed}
        counts["changed"] += len(changed)
        if bulk_ok and {tid for tid, _, _ in rescored} != set(batch) & set(cached):
            bulk_ok = give_up("a task planned for the bulk refresh could not be re-scored")
        items = {tid: item for tid, item, _ in rescored}  # a new version even where the result is unchanged
        if bulk_ok:
            try:
                counts["posted"] += importer.add(items)
            except LabelStudioAPIError as exc:
                bulk_ok = give_up(f"bulk import failed ({exc})")  # this batch's items were pending too
        else:
            post_each(items)
        missing = {tid: batch[tid] for tid in set(batch) - {tid for tid, _, _ in rescored}}
        tuned = f"{version}-{tuning.version}" if tuning.version else version
        counts["enqueued"] += _enqueue_predictions(pid, missing, xml, config.value_key, tuned)
        _progress(start + len(batch), len(ids), stage="refresh", model_version=mv, **counts)
        if runtime.get_bank_store().version(pid) != version or runtime.get_tuning(pid) != tuning:
            superseded = True
            break
    if bulk_ok:
        try:
            counts["posted"] += importer.flush()
        except LabelStudioAPIError as exc:
            bulk_ok = give_up(f"bulk import failed ({exc})")
    retired = 0
    # after a bulk re-post, or when nothing was stale (e.g. the retry of a refresh killed before
    # this step): delete our older versions whose every task now holds the current one
    cleanup = not stale and runtime.get_settings().ls_bulk_refresh
    if not superseded and len(bank) and ((bulk_ok and retire) or cleanup):
        try:
            retired = bulk_delivery.retire(pid, mv, OUR_VERSION_PREFIX)
        except LabelStudioAPIError as exc:  # the new predictions are in: the next refresh retires these
            log.log(logging.WARNING if retire else logging.INFO,
                    "project %s: deleting our model versions older than %s failed: %s", pid, mv, exc)
    result = {**counts, "model_version": mv, "superseded": superseded, "bulk": retire is not None,
              "retired": retired, "seconds": round(time.monotonic() - t0, 3)}
    log.info("project %s: refresh to %s: %d re-scored, %d changed, %d posted%s, %d failed, %d queued%s (%.2f s)",
             pid, mv, counts["rescored"], counts["changed"], counts["posted"],
             f" in bulk, {retired} old predictions deleted" if retire is not None else "", counts["failed"],
             counts["enqueued"], ", superseded" if superseded else "", result["seconds"])
    return result
