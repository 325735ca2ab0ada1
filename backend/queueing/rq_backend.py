"""The queue backend on Redis: RQ queues `<prefix>-<name>` for each of QUEUES, served by
`python -m backend.queueing.worker` processes (see backend/queueing/worker.py)."""
from __future__ import annotations

import logging
import threading
import time
import traceback
from datetime import datetime, timezone

import redis
from rq import Queue, Retry
from rq.exceptions import DeserializationError, NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import (DeferredJobRegistry, FailedJobRegistry, FinishedJobRegistry,
                         ScheduledJobRegistry, StartedJobRegistry)
from rq.worker_registration import WORKERS_BY_QUEUE_KEY

from backend.queueing.execution import JSONJob, death_penalty
from backend.queueing.jobinfo import (ACTIVE, FAILURE_TTL_S, HEALTH_MAX_AGE_S, HEALTH_TIMEOUT_S, QUEUES,
                                      RESULT_TTL_S, SERIALIZER, UNREADABLE, JobInfo, QueueUnavailable,
                                      error_line, retry_intervals)
from backend.settings import Settings

log = logging.getLogger("backend.queueing")


class RQBackend:
    """RQ on the configured Redis."""

    mode = "rq"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.redis = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=1, socket_timeout=5,
                                          health_check_interval=30)
        # a separate client with tight timeouts: /health must answer in < 100 ms, even with Redis down
        self.fast = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=HEALTH_TIMEOUT_S,
                                         socket_timeout=HEALTH_TIMEOUT_S)
        self.queues = {name: Queue(settings.queue_name(name), connection=self.redis, serializer=SERIALIZER)
                       for name in QUEUES}
        self._health: tuple[float, dict | None] = (0.0, None)
        self._health_lock = threading.Lock()

    def enqueue(self, func_path: str, args: tuple, kwargs: dict, queue: str, job_id: str | None,
                meta: dict | None, retries: int, timeout: int | None) -> str:
        """Queue the job; a `job_id` that is queued, scheduled or running already is not queued twice."""
        try:
            if job_id and (self.redis.hget(Job.key_for(job_id), "status") or b"").decode() in ACTIVE:
                return job_id
            job = self.queues[queue].enqueue_call(
                func_path, args=args, kwargs=kwargs, timeout=timeout or self.settings.job_timeout_s,
                result_ttl=RESULT_TTL_S, failure_ttl=FAILURE_TTL_S, job_id=job_id, meta=meta or {},
                retry=Retry(max=retries, interval=retry_intervals(retries)) if retries > 0 else None,
                description=func_path)  # rq logs the description: no payloads
        except redis.exceptions.RedisError as exc:
            raise QueueUnavailable(f"Redis unavailable: {type(exc).__name__}") from exc
        return job.id

    def _info(self, job: Job) -> JobInfo:
        raw = job.get_status(refresh=False)
        status = str(getattr(raw, "value", raw) or "unknown")
        try:
            return self._readable_info(job, status)
        except (DeserializationError, ValueError) as exc:  # JSONDecodeError, UnicodeDecodeError are ValueErrors
            log.warning("job %s: %s (%s)", job.id, UNREADABLE, type(exc.__cause__ or exc).__name__)
            return JobInfo(id=job.id, func="", status=status, error=UNREADABLE,
                           enqueued_at=job.enqueued_at, ended_at=job.ended_at)

    @staticmethod
    def _readable_info(job: Job, status: str) -> JobInfo:
        result, error = None, None
        if status == "finished":
            result = job.return_value()
        elif status in ("failed", "stopped"):
            latest = job.latest_result()
            error = error_line(latest.exc_string if latest else None) or status
        if "unserialized" in job.meta:  # rq's placeholder for a meta it could not read
            raise DeserializationError("meta")
        return JobInfo(id=job.id, func=job.func_name, status=status,
                       meta=dict(job.meta or {}), result=result, error=error,
                       enqueued_at=_aware(job.enqueued_at), ended_at=_aware(job.ended_at))

    def fetch(self, job_id: str) -> JobInfo | None:
        try:
            return self._info(Job.fetch(job_id, connection=self.redis, serializer=SERIALIZER))
        except NoSuchJobError:
            return None
        except redis.exceptions.RedisError as exc:
            raise QueueUnavailable(f"Redis unavailable: {type(exc).__name__}") from exc

    def fetch_many(self, job_ids: list[str]) -> list[JobInfo | None]:
        try:
            jobs = Job.fetch_many(job_ids, connection=self.redis, serializer=SERIALIZER)  # one round trip
            return [self._info(job) if job is not None else None for job in jobs]
        except redis.exceptions.RedisError as exc:
            raise QueueUnavailable(f"Redis unavailable: {type(exc).__name__}") from exc

    def serve_interactive(self) -> int:
        """Pop the interactive jobs queued now (LPOP: each one reaches one worker) and run them
        here, recording their outcome as a worker does (finished with its result, or failed)."""
        queue = self.queues["interactive"]
        served = 0
        while (raw := self.redis.lpop(queue.key)) is not None:
            try:
                job = JSONJob.fetch(raw.decode(), connection=self.redis, serializer=SERIALIZER)
                job.func_name  # noqa: B018 - a job hash that is not JSON fails here, before it runs
            except (NoSuchJobError, DeserializationError, ValueError) as exc:
                log.warning("interactive job %r skipped: %s", raw[:80], type(exc).__name__)
                continue
            _perform_inline(job, job.timeout or self.settings.job_timeout_s)
            served += 1
        return served

    def list_jobs(self, limit: int) -> list[JobInfo]:
        ids: set[str] = set()
        for q in self.queues.values():  # the newest `limit` of each place a job can be
            ids.update(x.decode() for x in self.redis.lrange(q.key, -limit, -1))
            for registry in (StartedJobRegistry, ScheduledJobRegistry, DeferredJobRegistry,
                             FinishedJobRegistry, FailedJobRegistry):
                # cleanup=False: RQ's cleanup would fail (or spend a retry of) a job abandoned by a
                # dead worker; the workers requeue those themselves (backend.queueing.worker)
                ids.update(registry(queue=q).get_job_ids(0, limit - 1, desc=True, cleanup=False))
        jobs = [j for j in Job.fetch_many(list(ids), connection=self.redis, serializer=SERIALIZER) if j is not None]
        epoch = datetime.min.replace(tzinfo=timezone.utc)
        jobs.sort(key=lambda j: _aware(j.enqueued_at) or epoch, reverse=True)
        return [self._info(j) for j in jobs[:limit]]

    def health(self, max_age: float = HEALTH_MAX_AGE_S) -> dict:
        """Snapshot no older than `max_age` s; while another thread refreshes it, the last one
        is returned at once (a stalled Redis then costs one thread 2 x 0.2 s, not every caller)."""
        snap_at, snap = self._health
        if snap is not None and time.monotonic() - snap_at <= max_age:
            return snap
        if not self._health_lock.acquire(blocking=snap is None):
            return snap
        try:
            snap = self._probe()
            self._health = (time.monotonic(), snap)
            return snap
        finally:
            self._health_lock.release()

    def _probe(self) -> dict:
        try:
            with self.fast.pipeline(transaction=False) as pipe:
                pipe.ping()
                for q in self.queues.values():
                    pipe.llen(q.key)
                    pipe.scard(WORKERS_BY_QUEUE_KEY % q.name)
                replies = pipe.execute()
        except redis.exceptions.RedisError as exc:
            return {"mode": self.mode, "ok": False, "error": type(exc).__name__}
        lengths = replies[1::2]
        workers = replies[2::2]
        return {"mode": self.mode, "ok": True,
                "queued": dict(zip(QUEUES, map(int, lengths))),
                "workers": dict(zip(QUEUES, map(int, workers)))}


def _perform_inline(job: JSONJob, timeout: int) -> None:
    """Run an RQ job in the calling job's worker (its timeout enforced from a timer thread, as the
    embedded worker does) and store its outcome as RQ's worker would."""
    job.started_at = datetime.now(timezone.utc)
    try:
        with death_penalty(timeout):
            job.perform()
        failure = None
    except Exception:  # noqa: BLE001 - its failure is recorded; the job that served it carries on
        failure = traceback.format_exc()
        log.error("interactive job %s (%s) failed: %s", job.id, job.func_name, error_line(failure))
    job.ended_at = datetime.now(timezone.utc)
    with job.connection.pipeline() as pipe:
        if failure is None:
            job._handle_success(RESULT_TTL_S, pipeline=pipe, worker_name="inline")
        else:
            job.set_status(JobStatus.FAILED, pipeline=pipe)
            job.save(pipeline=pipe, include_meta=False, include_result=False)
            job._handle_failure(failure, pipe, worker_name="inline")
        pipe.execute()


def _aware(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value
