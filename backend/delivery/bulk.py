"""Replacing our predictions of many tasks at once, for refreshes (instead of one PATCH per task).

A real Label Studio answers a prediction PATCH in ~70 ms (bench/bench_ls_posting.py), far more than
re-scoring a cached task. For a refresh of many tasks the backend therefore:
  1. checks (`plan`, one GET of the project's predictions) that every prediction of our older model
     versions sits on a task it is about to re-post or on one that already holds the new version,
     and that none of the tasks to re-post holds the new version yet;
  2. imports the new predictions in few large requests (`/import/predictions`; LS's cost per request
     grows with the project, ~0.5 s at 1,000 tasks whatever the batch size, so `Importer` collects
     up to BULK_IMPORT_ITEMS items or BULK_IMPORT_BYTES of JSON per request);
  3. deletes (`retire`) each older version of ours whose every prediction sits on a task that now
     holds the new version (checked again against LS, so a partial import deletes nothing it did
     not replace).
When the check fails (an older prediction on a task that is not re-posted, an LS without these
endpoints, ...) the refresh PATCHes task by task as before. A worker killed between 2 and 3 leaves
both versions on those tasks; the next refresh (the job's retry included, which finds nothing stale)
runs step 3 again.
"""
from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

from backend.errors import LabelStudioAPIError
from backend.ls.ls_client import LabelStudioClient
from backend.storage.tasks_registry import TaskRecord, result_hash

if TYPE_CHECKING:
    from backend.jobs.context import JobContext

log = logging.getLogger(__name__)

BULK_MIN_TASKS = 20            # below this, per-task PATCHes cost less than the check
BULK_MAX_PREDICTIONS = 20_000  # beyond this, listing the project (results included, ~7 KiB each) costs too much
BULK_IMPORT_ITEMS = 1000       # predictions per import request
BULK_IMPORT_BYTES = 32 << 20   # JSON bytes of results per import request (LS accepts 250 MB)


def _holders(client: LabelStudioClient, pid: int, counts: dict[str, int]) -> dict[str, set[int]] | None:
    """{model_version: task ids holding it} from one listing of the project's predictions, or None
    when the listing does not account for every prediction LS counts (e.g. a paginated answer):
    deleting a whole version is only safe on a complete picture."""
    listing = client.list_project_predictions(pid)
    if len(listing) != sum(counts.values()):
        log.info("project %s: %d predictions listed, %d counted; no bulk replacement", pid, len(listing),
                 sum(counts.values()))
        return None
    holders: dict[str, set[int]] = {}
    for p in listing:
        holders.setdefault(str(p.get("model_version") or ""), set()).add(int(p.get("task") or 0))
    return holders


def plan(ctx: "JobContext", records: dict[int, TaskRecord], model_version: str, prefix: str) -> list[str] | None:
    """Older model versions of ours (`prefix`) that a bulk re-post of `records` will make
    retirable, or None when this refresh must go task by task. `records`: the tasks about to be
    re-scored."""
    pid = ctx.pid
    if not ctx.settings.ls_bulk_refresh or len(records) < BULK_MIN_TASKS:
        return None
    try:
        client = ctx.ls_client
        counts = client.model_version_counts(pid)
        if sum(counts.values()) > BULK_MAX_PREDICTIONS:
            return None
        old = sorted(v for v in counts if v.startswith(prefix) and v != model_version)
        holders = _holders(client, pid, counts) if old or model_version in counts else {}
        if holders is None:
            return None
    except LabelStudioAPIError as exc:
        log.info("project %s: bulk refresh not possible (%s); posting task by task", pid, exc)
        return None
    stranded = set().union(*(holders.get(v, set()) for v in old)) - set(records) - holders.get(model_version, set())
    if stranded:
        log.info("project %s: %d tasks hold our older predictions but are not re-scored now; "
                 "posting task by task", pid, len(stranded))
        return None
    if holders.get(model_version, set()) & set(records):
        return None  # some already hold the new version: importing would duplicate it
    return old


def post(ctx: "JobContext", items: dict[int, dict]) -> dict:
    """Import every item as a new prediction in one request and record them (prediction ids are
    not returned by LS: the records get None, and a later per-task post finds ours by version)."""
    pid = ctx.pid
    payload = [{"task": int(tid), "result": item["result"], "score": item["score"],
                "model_version": item["model_version"]} for tid, item in items.items()]
    created = ctx.ls_client.import_predictions(pid, payload)
    if created != len(payload):
        raise LabelStudioAPIError(f"project {pid}: Label Studio created {created} of {len(payload)} predictions")
    ctx.registry.update(pid, {tid: {"prediction_id": None, "result_hash": result_hash(item["result"]),
                                              "model_version": item["model_version"]}
                                        for tid, item in items.items()})
    return {"posted": len(payload)}


class Importer:
    """Collects refreshed items and imports them in few large requests.

    `add` and `flush` return how many predictions they posted; when one raises, the items not
    imported stay pending, and `drain` hands them back so the caller can post them task by task."""

    def __init__(self, ctx: "JobContext", max_items: int | None = None, max_bytes: int | None = None) -> None:
        self.ctx = ctx
        self.max_items = max_items or BULK_IMPORT_ITEMS
        self.max_bytes = max_bytes or BULK_IMPORT_BYTES
        self.pending: dict[int, dict] = {}
        self.bytes = 0

    def add(self, items: dict[int, dict]) -> int:
        self.pending.update(items)
        self.bytes += sum(len(json.dumps(item["result"])) for item in items.values())
        return self.flush() if len(self.pending) >= self.max_items or self.bytes >= self.max_bytes else 0

    def flush(self) -> int:
        if not self.pending:
            return 0
        posted = post(self.ctx, self.pending)["posted"]
        self.pending, self.bytes = {}, 0
        return posted

    def drain(self) -> dict[int, dict]:
        out, self.pending, self.bytes = self.pending, {}, 0
        return out


def retire(ctx: "JobContext", model_version: str, prefix: str) -> int:
    """Delete each older model version of ours (`prefix`) whose every prediction sits on a task that
    holds `model_version`; returns how many predictions went. Cheap when there is none (one
    aggregate GET)."""
    pid, client = ctx.pid, ctx.ls_client
    counts = client.model_version_counts(pid)
    old = [v for v in counts if v.startswith(prefix) and v != model_version]
    if not old or not counts.get(model_version) or sum(counts.values()) > BULK_MAX_PREDICTIONS:
        return 0
    holders = _holders(client, pid, counts)
    if holders is None:
        return 0
    current = holders.get(model_version, set())
    deleted = 0
    for version in old:
        if holders.get(version, set()) <= current:
            deleted += client.delete_model_version(pid, version)
        else:
            log.info("project %s: keeping %s: %d of its tasks do not hold %s yet", pid, version,
                     len(holders.get(version, set()) - current), model_version)
    return deleted
