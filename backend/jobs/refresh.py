"""refresh_project: after a bank (or tuning) change, bring every processed task's prediction to the
new model_version.

Each task is re-scored from its cached proposals (no SAM2/DINOv2 run) and posted task by task
(backend.delivery.post: a PATCH of the version alone where the result did not change), or, for
many tasks, all of them replaced in bulk (backend.delivery.bulk), which records each import as it
lands and never imports a version a re-posted task already holds (a worker killed between an
import and its record write can leave one task with two predictions of the new version). Tasks
without cached proposals get a predict job. The registry's records are read once per refresh.
"""
from __future__ import annotations

import logging
import time
from dataclasses import replace

from backend import queueing
from backend.delivery import bulk
from backend.delivery.post import OUR_VERSION_PREFIX, deliver
from backend.errors import LabelStudioAPIError
from backend.jobs.context import JobContext, progress
from backend.jobs.inference import cached_key, current_bank, match_item
from backend.regions.label_config import LabelConfig, parse_label_config
from backend.regions.results import prediction_item
from backend.storage import label_configs
from backend.storage.bank_store import Tuning, bank_version
from backend.storage.store import DELIVERY_TTL_S
from backend.storage.tasks_registry import TaskRecord, result_hash
from model.bank import MemoryBank
from model.engine import match_pool

log = logging.getLogger(__name__)

REFRESH_BATCH = 50  # tasks re-scored, posted and recorded per round (progress granularity)


def rescore_cached(ctx: JobContext, bank: MemoryBank, records: dict[int, TaskRecord] | None = None,
                   config: LabelConfig | None = None, tuning: Tuning | None = None) -> list[tuple[int, dict, bool]]:
    """(task id, new item, changed) for every registered task whose proposals are cached, in
    `records` order (all the project's registered tasks unless given).

    No model runs: cached proposals are re-matched against `bank`, REFRESH_THREADS tasks at once
    (model.engine.match_pool; cache reads, torch, numpy and OpenCV release the GIL). `changed`
    compares the result with the one last delivered. With an empty bank every task gets an empty
    result. `tuning`: the project's tuning in force unless given.
    """
    if config is None:
        xml = ctx.banks.label_config(ctx.pid)
        if not xml:
            return []
        config = parse_label_config(xml)
    if records is None:
        records = ctx.registry.all(ctx.pid)
    tuning = tuning if tuning is not None else ctx.tuning()
    mv = ctx.model_version(bank_version(bank), tuning)
    cache = ctx.proposal_cache

    def rescore(task: tuple[int, TaskRecord]) -> tuple[int, dict, bool] | None:
        queueing.serve_interactive()
        task_id, record = task
        if len(bank) == 0:
            item = prediction_item([], mv)
        else:
            key = cached_key(ctx, record)
            found = cache.get(key) if key else None
            if found is None:
                return None
            item = match_item(ctx, found, key, bank, config, mv, tuning)
        return task_id, item, result_hash(item["result"]) != record.result_hash

    threads = min(len(records), ctx.settings.refresh_threads)
    if threads > 1:
        with match_pool(threads) as pool:
            out = list(pool.map(rescore, records.items()))
    else:
        out = [rescore(task) for task in records.items()]
    return [r for r in out if r is not None]


def enqueue_predictions(ctx: JobContext, records: dict[int, TaskRecord], config_hash: str, version: str) -> int:
    """Queue predict jobs (delivering through the LS API) for registered tasks without cached
    proposals; at most once per task and bank version. `config_hash`: the stored label config."""
    pid, store = ctx.pid, ctx.store
    queued = 0
    for task_id, record in records.items():
        key = f"delivery:{pid}:refresh-{task_id}-{version}"
        if not store.setnx(key, "api", DELIVERY_TTL_S):  # pre-claimed: the job posts to LS itself
            continue
        try:
            queueing.enqueue("backend.jobs.predict.predict_task", pid, task_id, record.image_url, config_hash, key,
                             queue="predict", job_id=f"predict-{pid}-{task_id}-{version}",
                             meta={"project": pid, "task": task_id})
        except Exception:
            store.delete(key)  # not queued: the next refresh must be able to try again
            raise
        queued += 1
    return queued


class _Refresh:
    """One refresh run: the project's state read once at the start, its counts, and the bulk
    importer while bulk mode holds."""

    def __init__(self, ctx: JobContext, xml: str) -> None:
        self.ctx, self.xml = ctx, xml
        self.config = parse_label_config(xml)
        self.bank = current_bank(ctx)
        self.version = bank_version(self.bank)
        self.tuning = ctx.tuning()
        self.mv = ctx.model_version(self.version, self.tuning)
        registered = ctx.registry.all(ctx.pid)
        self.stale = {tid: rec for tid, rec in sorted(registered.items()) if rec.model_version != self.mv}
        self.counts = {"tasks": len(registered), "current": len(registered) - len(self.stale), "rescored": 0,
                       "changed": 0, "posted": 0, "failed": 0, "enqueued": 0}
        cache = ctx.proposal_cache
        self.cached = {tid: rec for tid, rec in self.stale.items()
                       if (key := cached_key(ctx, rec)) and cache.contains(key)}
        self.retire = bulk.plan(ctx, self.cached, self.mv, OUR_VERSION_PREFIX) if len(self.bank) else None
        self.bulk_ok = self.retire is not None
        self.importer = bulk.Importer(ctx)
        self.superseded = False
        self.config_hash: str | None = None

    def post_each(self, items: dict[int, dict], records: dict[int, TaskRecord]) -> None:
        if items:
            delivered = deliver(self.ctx, items, records)
            self.counts["posted"] += delivered["posted"]
            self.counts["failed"] += delivered["failed"]

    def give_up(self, why: str) -> None:
        """Leave bulk mode: what was collected but not imported goes task by task. A failed import
        may still have landed in LS, so those tasks forget the prediction id they knew: each post
        then updates our newest prediction there (the imported one if it exists)."""
        log.warning("project %s: %s; posting task by task", self.ctx.pid, why)
        self.bulk_ok = False
        items = self.importer.drain()
        if items:
            self.ctx.registry.update(self.ctx.pid, {tid: {"prediction_id": None} for tid in items})
        self.post_each(items, {tid: replace(self.stale[tid], prediction_id=None) for tid in items})

    def _queue_missing(self, missing: dict[int, TaskRecord]) -> None:
        if not missing:
            return
        if self.config_hash is None:
            self.config_hash = label_configs.put(self.ctx.store, self.xml)
        tuned = f"{self.version}-{self.tuning.version}" if self.tuning.version else self.version
        self.counts["enqueued"] += enqueue_predictions(self.ctx, missing, self.config_hash, tuned)

    def batch(self, batch: dict[int, TaskRecord]) -> None:
        """Re-score, post and record one batch of stale tasks; queue those without cached proposals."""
        rescored = rescore_cached(self.ctx, self.bank, records=batch, config=self.config, tuning=self.tuning)
        self.counts["rescored"] += len(rescored)
        self.counts["changed"] += sum(1 for _, _, is_changed in rescored if is_changed)
        done = {tid for tid, _, _ in rescored}
        if self.bulk_ok and done != set(batch) & set(self.cached):
            self.give_up("a task planned for the bulk refresh could not be re-scored")
        items = {tid: item for tid, item, _ in rescored}  # a new version even where the result is unchanged
        if self.bulk_ok:
            try:
                self.counts["posted"] += self.importer.add(items)
            except LabelStudioAPIError as exc:
                self.give_up(f"bulk import failed ({exc})")  # this batch's items were pending too
        else:
            self.post_each(items, batch)
        self._queue_missing({tid: batch[tid] for tid in batch if tid not in done})

    def run(self) -> None:
        """Every batch, until done or superseded by another bank or tuning change (which queued its
        own refresh)."""
        ids = list(self.stale)
        for start in range(0, len(ids), REFRESH_BATCH):
            batch = {tid: self.stale[tid] for tid in ids[start:start + REFRESH_BATCH]}
            self.batch(batch)
            progress(start + len(batch), len(ids), stage="refresh", model_version=self.mv, **self.counts)
            if self.ctx.banks.version(self.ctx.pid) != self.version or self.ctx.tuning() != self.tuning:
                self.superseded = True
                return

    def finish(self) -> int:
        """Import what is pending; delete our older versions where that is safe. Predictions deleted."""
        if self.bulk_ok:
            try:
                self.counts["posted"] += self.importer.flush()
            except LabelStudioAPIError as exc:
                self.give_up(f"bulk import failed ({exc})")
        # after a bulk re-post, or when nothing was stale (e.g. the retry of a refresh killed before
        # this step): delete our older versions whose every task now holds the current one
        cleanup = not self.stale and self.ctx.settings.ls_bulk_refresh
        if self.superseded or not len(self.bank) or not ((self.bulk_ok and self.retire) or cleanup):
            return 0
        try:
            return bulk.retire(self.ctx, self.mv, OUR_VERSION_PREFIX)
        except LabelStudioAPIError as exc:  # the new predictions are in: the next refresh retires these
            log.log(logging.WARNING if self.retire else logging.INFO,
                    "project %s: deleting our model versions older than %s failed: %s", self.ctx.pid, self.mv, exc)
            return 0


def refresh_project(pid: int) -> dict:
    """Re-label every processed task of the project with the current bank (see module docstring).

    Tasks already delivered with the current model_version are skipped; the rest are re-scored from
    cached proposals in batches and posted. Stops early when the bank or its tuning changes again.
    """
    t0 = time.monotonic()
    ctx = JobContext.for_project(pid)
    xml = ctx.banks.label_config(pid)
    if not xml:
        return {"status": "project was never set up", "seconds": 0.0}
    run = _Refresh(ctx, xml)
    run.run()
    retired = run.finish()
    counts, mv = run.counts, run.mv
    result = {**counts, "model_version": mv, "superseded": run.superseded, "bulk": run.retire is not None,
              "retired": retired, "seconds": round(time.monotonic() - t0, 3)}
    log.info("project %s: refresh to %s: %d re-scored, %d changed, %d posted%s, %d failed, %d queued%s (%.2f s)",
             pid, mv, counts["rescored"], counts["changed"], counts["posted"],
             f" in bulk, {retired} old predictions deleted" if run.retire is not None else "", counts["failed"],
             counts["enqueued"], ", superseded" if run.superseded else "", result["seconds"])
    return result
