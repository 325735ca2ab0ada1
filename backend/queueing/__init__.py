"""The one job-queue interface other code calls, for both deployment modes.

* With `REDIS_URL`: RQ queues `<prefix>-interactive`, `<prefix>-bank`, `<prefix>-predict` and
  `<prefix>-evaluate` (backend/queueing/rq_backend.py), served by `python -m backend.queueing.worker`
  processes (backend/queueing/worker.py), which take them in that order. Webhooks that arrive while
  Redis is down wait in a durable spool (backend/queueing/spool.py).
* Without `REDIS_URL` (the embedded default, one web process): one daemon thread of the web process
  runs the jobs kept in MODEL_DIR/state/queue.sqlite3 (backend/queueing/embedded.py).

Both modes behave alike, so a bug cannot hide in one of them: a job runs through the same function
(backend/queueing/execution.py), with the same ids (the caller's, else a uuid; an id that is queued,
scheduled or running is not queued twice), the same priority order of QUEUES, the same timeouts
(JOB_TIMEOUT_S unless given), the same retries after RETRY_BACKOFF_S, the requeue of a job whose
worker died running it (meta "abandoned" counts it), progress meta, and the same JobInfo.

Interactive jobs (a click in the editor, which an annotator waits for) never wait behind batch work:
workers take them first, and a job that runs many tasks calls `serve_interactive()` between two
tasks, which runs the interactive jobs queued meanwhile inline, so a click waits for one task's
work at most.

Job functions are referenced by import path ("backend.jobs.predict.predict_task") so the web process never
imports torch. They must be idempotent: retries and replays may run a job twice.

Nothing on the queue is pickled: job arguments, meta and results are JSON data (ids, URLs, hashes,
dicts of those), stored with RQ's JSONSerializer or as JSON text in SQLite. `enqueue` and
`update_meta` check that in both modes (a non-JSON value raises the same TypeError in both). A job
hash in Redis that is not JSON (e.g. a pickle planted there) is never unpickled: it reads as "unreadable".
"""
from __future__ import annotations

import logging
import threading
from typing import Any

import redis
from rq import get_current_job

from backend import runtime
from backend.queueing.embedded import EmbeddedBackend
from backend.queueing.jobinfo import (FAILURE_TTL_S, HEALTH_MAX_AGE_S, QUEUES, RESULT_TTL_S, RETRY_BACKOFF_S,
                                      SERIALIZER, UNREADABLE, JobInfo, QueueUnavailable, json_data)
from backend.queueing.rq_backend import RQBackend
from backend.settings import Settings

__all__ = ["FAILURE_TTL_S", "HEALTH_MAX_AGE_S", "QUEUES", "RESULT_TTL_S", "RETRY_BACKOFF_S", "SERIALIZER",
           "UNREADABLE", "EmbeddedBackend", "JobInfo", "QueueUnavailable", "RQBackend", "Spool", "SpoolReplayer",
           "backend", "enqueue", "fetch", "fetch_many", "health", "json_data", "list_jobs", "serve_interactive",
           "submit_spooled", "update_meta"]

log = logging.getLogger(__name__)

_backend: RQBackend | EmbeddedBackend | None = None
_backend_settings: Settings | None = None
_backend_lock = threading.Lock()


def backend() -> RQBackend | EmbeddedBackend:
    """The process-wide queue backend for runtime.get_settings() (RQ iff REDIS_URL is set); rebuilt
    when those settings are replaced (runtime.configure/reset)."""
    global _backend, _backend_settings
    settings = runtime.get_settings()
    with _backend_lock:
        if _backend is None or _backend_settings is not settings:
            if isinstance(_backend, EmbeddedBackend):
                _backend.close()  # its thread would go on running jobs (and retries) beside the new one
            _backend = RQBackend(settings) if settings.redis_url else EmbeddedBackend(
                settings.model_dir / "state" / "queue.sqlite3", job_timeout_s=settings.job_timeout_s)
            _backend_settings = settings
        return _backend


def enqueue(func_path: str, *args: Any, queue: str = "predict", job_id: str | None = None,
            meta: dict | None = None, retries: int = 2, timeout: int | None = None, **kwargs: Any) -> str:
    """Queue `func_path(*args, **kwargs)` on one of QUEUES; returns the job id (`job_id` if given:
    a job of that id that is queued, scheduled or running is not queued again).

    `retries` failed attempts are retried (after 5 s, 30 s, 120 s). `timeout` (s) defaults to
    JOB_TIMEOUT_S. Raises QueueUnavailable when Redis cannot take the job, TypeError when the
    arguments or meta are not JSON data (in both modes).
    """
    if queue not in QUEUES:
        raise ValueError(f"unknown queue {queue!r}; expected one of {QUEUES}")
    args, kwargs = json_data(args, "job arguments"), json_data(kwargs, "job arguments")
    meta = json_data(meta, "job meta")
    return backend().enqueue(func_path, tuple(args), kwargs, queue, job_id, meta, retries, timeout)


def serve_interactive() -> int:
    """Run the interactive jobs queued now, here; returns how many. A job that works through many
    tasks calls it between two of them, so a click never waits for more than one task's work."""
    try:
        return backend().serve_interactive()
    except redis.exceptions.RedisError as exc:  # the long job carries on; the workers ride out outages
        log.warning("interactive jobs not served now: Redis unavailable (%s)", type(exc).__name__)
        return 0


def fetch(job_id: str) -> JobInfo | None:
    """The job's current state, None if unknown (or expired). Raises QueueUnavailable."""
    return backend().fetch(job_id)


def fetch_many(job_ids: list[str]) -> list[JobInfo | None]:
    """fetch() of several jobs at once (RQ: one pipelined round trip for the job hashes)."""
    return backend().fetch_many(list(job_ids))


def list_jobs(limit: int = 50) -> list[JobInfo]:
    """Most recent jobs first (queued, running, scheduled, finished, failed)."""
    return backend().list_jobs(limit)


def health(max_age: float = HEALTH_MAX_AGE_S) -> dict:
    """Cheap queue status for /health: mode, ok, queued counts (and workers in RQ mode), at most
    `max_age` s old. Never raises."""
    return backend().health(max_age)


def update_meta(**fields: Any) -> None:
    """Merge `fields` (e.g. done=3, total=10) into the running job's meta; visible in GET /jobs.

    Called from inside a job function; a no-op outside one. Raises TypeError if `fields` is not JSON data.
    """
    fields = json_data(fields, "job meta")
    job = get_current_job()
    if job is not None:
        job.meta.update(fields)
        job.save_meta()
    elif isinstance(_backend, EmbeddedBackend):
        _backend.update_current_meta(fields)


from backend.queueing.spool import Spool, SpoolReplayer, submit_spooled  # noqa: E402 - it uses the API above
