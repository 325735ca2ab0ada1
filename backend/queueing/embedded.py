"""The embedded queue backend (no REDIS_URL): one daemon thread of the web process runs the jobs
kept in a SQLite file (backend/queueing/jobdb.py), with the RQ path's job ids, priorities, timeouts,
retries and backoff, requeue of a job its process died running, and progress meta."""
from __future__ import annotations

import json
import logging
import threading
import time
import traceback
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from backend.queueing.execution import perform
from backend.queueing.jobdb import JobDB
from backend.queueing.jobinfo import EMBEDDED_HISTORY, JobInfo, error_line, retry_delay, retry_intervals

log = logging.getLogger("backend.queueing")


class EmbeddedBackend:
    """Jobs in `path` (":memory:": nothing kept, for tests), run in priority order by one thread
    started by the first enqueue (so the web process loads no model before a job needs one), or at
    once when the file holds jobs from before a restart. `clock` (epoch s) times retries."""

    mode = "embedded"

    def __init__(self, path: str | Path = ":memory:", *, job_timeout_s: int = 3600,
                 history: int = EMBEDDED_HISTORY, clock: Callable[[], float] = time.time) -> None:
        self.db = JobDB(path, history)
        self.job_timeout_s = job_timeout_s
        self._clock = clock
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._local = threading.local()
        for job_id in self.db.requeue_started():
            log.warning("job %s was running when its process stopped; requeued", job_id)
        if self.db.has_work():
            self._start()

    def enqueue(self, func_path: str, args: tuple, kwargs: dict, queue: str, job_id: str | None,
                meta: dict | None, retries: int, timeout: int | None) -> str:
        """Queue the job; a `job_id` that is queued, scheduled or running already is not queued twice."""
        job_id = job_id or str(uuid.uuid4())  # as RQ names a job
        if self.db.add(job_id, func_path, queue, list(args), dict(kwargs), dict(meta or {}),
                       retry_intervals(retries), timeout or self.job_timeout_s, self._clock()):
            self._start()
        return job_id

    def poke(self) -> None:
        """Queue the retries now due and wake the worker thread (the clock moved past a backoff)."""
        with self._wake:
            self.db.promote_due(self._clock())
            self._wake.notify_all()

    def close(self) -> None:
        """Stop taking jobs (the one running ends first): this process now queues elsewhere; what
        is left in the file waits for the next backend on it."""
        with self._wake:
            self._closed = True
            self._wake.notify_all()

    def _start(self) -> None:
        with self._wake:
            if self._closed:
                return
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="ntt-embedded-worker", daemon=True)
                self._thread.start()
            self._wake.notify_all()

    def _run(self) -> None:
        while True:
            with self._wake:
                if self._closed:
                    return
                due = self.db.promote_due(self._clock())
                job = self.db.claim()
                if job is None:
                    self._wake.wait(None if due is None else max(0.0, due - self._clock()))
                    continue
            self._execute(job)

    def serve_interactive(self) -> int:
        """Run the interactive jobs queued now in the calling thread (a job of this worker)."""
        self.db.promote_due(self._clock())
        served = 0
        while (job := self.db.claim("interactive")) is not None:
            self._execute(job)
            served += 1
        return served

    def _execute(self, job) -> None:  # noqa: ANN001 - a JobDB row
        outer = getattr(self._local, "job", None)  # the long job that serves an interactive one
        self._local.job = job["id"]
        args, kwargs = json.loads(job["args"])
        try:
            result = perform(job["func"], args, kwargs, job["timeout"])
        except Exception as exc:  # noqa: BLE001 - a job failure must not kill the worker thread
            self._failed(job, exc)
        else:
            self.db.finish(job["id"], result, self._clock())
        finally:
            self._local.job = outer

    def _failed(self, job, exc: Exception) -> None:  # noqa: ANN001 - a JobDB row
        log.error("job %s (%s) failed: %s", job["id"], job["func"], exc, exc_info=log.isEnabledFor(logging.DEBUG))
        if job["retries_left"] > 0:
            delay = retry_delay(json.loads(job["intervals"]), job["retries_left"])
            self.db.schedule_retry(job["id"], self._clock() + delay)
            log.info("job %s retried in %d s (%d retries left)", job["id"], delay, job["retries_left"] - 1)
        else:
            self.db.fail(job["id"], error_line("".join(traceback.format_exception_only(exc))), self._clock())

    def update_current_meta(self, fields: dict) -> None:
        """Merge into the meta of the job the calling thread runs (no-op outside the worker thread)."""
        job_id = getattr(self._local, "job", None)
        if job_id is not None:
            self.db.merge_meta(job_id, fields)

    def fetch(self, job_id: str) -> JobInfo | None:
        row = self.db.get(job_id)
        return _info(row) if row is not None else None

    def fetch_many(self, job_ids: list[str]) -> list[JobInfo | None]:
        return [self.fetch(job_id) for job_id in job_ids]

    def list_jobs(self, limit: int) -> list[JobInfo]:
        return [_info(row) for row in self.db.recent(limit)]

    def health(self, max_age: float = 0.0) -> dict:
        alive = self._thread is not None and self._thread.is_alive()
        return {"mode": self.mode, "ok": True, "queued": self.db.queued_counts(), "worker_started": alive}


def _info(row) -> JobInfo:  # noqa: ANN001 - a JobDB row
    return JobInfo(id=row["id"], func=row["func"], status=row["status"], meta=json.loads(row["meta"]),
                   result=json.loads(row["result"]) if row["result"] is not None else None, error=row["error"],
                   enqueued_at=_when(row["enqueued_at"]), ended_at=_when(row["ended_at"]))


def _when(epoch: float | None) -> datetime | None:
    return datetime.fromtimestamp(epoch, timezone.utc) if epoch is not None else None
