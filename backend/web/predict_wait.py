"""How a /predict call waits for its jobs, then hands what is still running over to the workers.

The call polls its jobs until PREDICT_BUDGET_S, on one of Settings.predict_waiting_calls waiting
slots: with every slot taken it does not wait at all, so waiting calls never take the web threads
LS's /health and /setup need. At the deadline each running job's delivery key is claimed for "api"
(store.claim): the job, which claims it for "web" when it finishes, then posts its prediction
through the LS API itself, and the call answers an item without "result" (LS skips it). A job that
won the claim for "web" is about to return: its result is awaited HANDOVER_GRACE_S longer.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any

from backend import queueing, runtime
from backend.web.metrics import Metrics

log = logging.getLogger(__name__)

HANDOVER_GRACE_S = 5.0               # the job claimed delivery to the web: its result is moments away
POLL_START_S, POLL_MAX_S = 0.02, 0.25
POLL_CLICK_S = 0.02                  # an annotator waits on a click: poll its job at this pace

Pending = dict[int, tuple[str, str]]  # item index -> (job id, delivery key)


class PredictWaiter:
    """The waiting slots and the poll/claim protocol of one app's /predict calls."""

    def __init__(self, waiting_calls: int, budget_s: float, metrics: Metrics) -> None:
        self._slots = threading.BoundedSemaphore(waiting_calls)
        self._budget_s = budget_s
        self._metrics = metrics

    def deadline(self) -> float:
        """When a call starting now stops waiting (time.monotonic())."""
        return time.monotonic() + self._budget_s

    def wait(self, pending: Pending, items: list, mv: str, deadline: float,
             max_pause: float = POLL_MAX_S) -> None:
        """Collect results until `deadline` on a waiting slot; without a free slot, not at all."""
        if not pending:
            return
        if not self._slots.acquire(blocking=False):
            self._metrics.inc("predict_calls_not_waited")
            return
        try:
            pause = POLL_START_S
            while pending and time.monotonic() < deadline:
                collect(pending, items, mv)
                if pending:
                    time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
                    pause = min(pause * 1.5, max_pause)
        finally:
            self._slots.release()

    def hand_over(self, pid: int, pending: Pending, items: list, mv: str) -> None:
        """Deadline reached: the workers deliver through the LS API whatever we win the claim for."""
        store = runtime.get_store()
        waiting: Pending = {}
        for i, (job_id, key) in pending.items():
            try:
                winner = store.claim(key, "api")
            except Exception as exc:  # noqa: BLE001 - store down: the job will deliver to nobody
                log.warning("project %s: delivery claim for job %s failed: %s", pid, job_id, type(exc).__name__)
                items[i] = {"model_version": mv, "error": "prediction did not finish in time"}
                continue
            if winner == "api":
                self._metrics.inc("predictions_deferred")
                items[i] = {"model_version": mv, "status": "deferred", "job": job_id,
                            "detail": "still running; the workers will post it to Label Studio"}
            else:
                waiting[i] = (job_id, key)
        grace_end = time.monotonic() + HANDOVER_GRACE_S
        while waiting and time.monotonic() < grace_end:
            collect(waiting, items, mv)
            if waiting:
                time.sleep(POLL_START_S)
        for i, (job_id, _) in waiting.items():
            items[i] = {"model_version": mv, "error": f"job {job_id} finished but its result was not readable"}


def collect(pending: Pending, items: list, mv: str) -> None:
    """Move finished/failed jobs from `pending` into `items`."""
    indexes = list(pending)
    try:
        infos = queueing.fetch_many([pending[i][0] for i in indexes])
    except queueing.QueueUnavailable:
        return  # Redis blipped: try again on the next round
    for i, info in zip(indexes, infos):
        if info is None:
            items[i] = {"model_version": mv, "error": "prediction job expired or was lost"}
        elif info.status == "finished":
            items[i] = as_item(info.result, mv)
        elif info.done:
            items[i] = {"model_version": mv, "error": info.error or info.status}
        else:
            continue
        del pending[i]


def as_item(result: Any, mv: str) -> dict:
    """A job's return value as a /predict item (an LS prediction, or an error item)."""
    if isinstance(result, dict) and isinstance(result.get("result"), list):
        return {"model_version": mv, **result}
    if isinstance(result, dict) and result.get("error"):
        return {"model_version": result.get("model_version", mv), "error": str(result["error"])}
    return {"model_version": mv, "error": "prediction job returned no result"}
