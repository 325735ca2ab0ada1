"""One job-queue interface for both deployment modes.

* With `REDIS_URL`: RQ queues `<prefix>-interactive`, `<prefix>-bank` and `<prefix>-predict`, served
  by `python -m backend.queueing.worker` processes (see backend/queueing/worker.py), which take them in that order.
  Failed jobs are retried with backoff (also when a worker dies mid-job: RQ requeues abandoned jobs
  that have retries left).
* Webhooks that arrive while Redis is down are appended to a durable spool (`Spool`, jsonl +
  fsync under MODEL_DIR/spool) and enqueued in order by `SpoolReplayer` once Redis answers again.
* Without `REDIS_URL` (the embedded default): ONE daemon thread in this process consumes a priority
  queue (interactive jobs first, then bank jobs, then predict jobs) and calls the same functions by
  import path. It starts on the first `enqueue`, so the web process never loads models at start; the first job does. Jobs are
  lost if the process dies (there is nothing to share them with) and timeouts are not enforced.

Interactive jobs (a click in the editor, which an annotator waits for) never wait behind batch work:
workers take them first, and a job that runs many tasks calls `serve_interactive()` between two
tasks, which runs the interactive jobs queued meanwhile inline, so a click waits for one task's
work at most.

Job functions are referenced by import path ("backend.jobs.predict.predict_task") so the web process never
imports torch. They must be idempotent: retries and replays may run a job twice.

Nothing on the queue is pickled: job arguments, meta and results are JSON data (ids, URLs, hashes,
dicts of those), stored with RQ's JSONSerializer. `enqueue` and `update_meta` check that in both modes
(a non-JSON value raises the same TypeError in both), the embedded worker gives a job the JSON copy
of its arguments and keeps the JSON copy of its result, as RQ does. A job hash that is not JSON
(e.g. a pickle planted in Redis) is never deserialized by pickle: it reads as "unreadable".
"""
from __future__ import annotations

import fcntl
import heapq
import importlib
import itertools
import json
import logging
import os
import queue as queue_mod
import re
import threading
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import redis
from rq import Queue, Retry, get_current_job
from rq.exceptions import DeserializationError, NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import (DeferredJobRegistry, FailedJobRegistry, FinishedJobRegistry,
                         ScheduledJobRegistry, StartedJobRegistry)
from rq.serializers import JSONSerializer
from rq.worker_registration import WORKERS_BY_QUEUE_KEY

from model.atomic import atomic_write
from backend import runtime
from backend.settings import Settings

log = logging.getLogger(__name__)

QUEUES = ("interactive", "bank", "predict", "evaluate")  # in priority order (clicks first; evaluations never before a waiting prediction)
RETRY_BACKOFF_S = (5, 30, 120)            # delay before retry 1, 2, 3 (the last repeats)
RESULT_TTL_S = 24 * 3600                  # finished jobs stay readable by /predict and /jobs
FAILURE_TTL_S = 7 * 24 * 3600
HEALTH_TIMEOUT_S = 0.2
HEALTH_MAX_AGE_S = 2.0                    # /health reads a snapshot the spool thread refreshes each second
EMBEDDED_HISTORY = 1000                   # jobs remembered by the embedded worker
_INTERACTIVE = QUEUES.index("interactive")
TERMINAL = frozenset({"finished", "failed", "stopped", "canceled"})
SERIALIZER = JSONSerializer               # for every RQ Queue, Job and Worker: never pickle
UNREADABLE = "job data in Redis is not JSON: refused (was it written by an older version or planted?)"


class QueueUnavailable(RuntimeError):
    """The queue backend (Redis) cannot take the job now."""


@dataclass
class JobInfo:
    """What the web needs to know about a job, in either mode."""

    id: str
    func: str
    status: str                     # queued, started, scheduled, deferred, finished, failed, stopped, canceled
    meta: dict = field(default_factory=dict)
    result: Any = None
    error: str | None = None        # last line of the exception (no traceback)
    enqueued_at: datetime | None = None
    ended_at: datetime | None = None

    @property
    def done(self) -> bool:
        return self.status in TERMINAL

    def to_dict(self, with_result: bool = False) -> dict:
        out = {"id": self.id, "func": self.func, "status": self.status, "meta": self.meta,
               "error": self.error,
               "enqueued_at": self.enqueued_at.isoformat() if self.enqueued_at else None,
               "ended_at": self.ended_at.isoformat() if self.ended_at else None}
        if with_result:
            out["result"] = self.result
        return out


def _error_line(exc_string: str | None) -> str | None:
    """'ImageError: bad thing' from a formatted traceback (tracebacks stay in the worker log)."""
    if not exc_string:
        return None
    lines = [ln for ln in exc_string.strip().splitlines() if ln.strip()]
    if not lines:
        return None
    line = re.sub(r"^[\w.]+\.(\w+):", r"\1:", lines[-1].strip())  # backend.errors.ImageError -> ImageError
    return line[:500]


def json_data(value: Any, what: str) -> Any:
    """The JSON copy of `value` (tuples become lists); TypeError naming `what` when it is not JSON data."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{what} must be JSON data (ids, URLs, hashes, lists and dicts of those): {exc}") from None


def _retry(retries: int) -> Retry | None:
    if retries <= 0:
        return None
    intervals = [RETRY_BACKOFF_S[min(i, len(RETRY_BACKOFF_S) - 1)] for i in range(retries)]
    return Retry(max=retries, interval=intervals)


def _import(func_path: str) -> Callable:
    module, _, name = func_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


# ---------------------------------------------------------------------------------------- RQ
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
        try:
            job = self.queues[queue].enqueue_call(
                func_path, args=args, kwargs=kwargs, timeout=timeout or self.settings.job_timeout_s,
                result_ttl=RESULT_TTL_S, failure_ttl=FAILURE_TTL_S, job_id=job_id, meta=meta or {},
                retry=_retry(retries), description=func_path)  # rq logs the description: no payloads
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
            error = _error_line(latest.exc_string if latest else None) or status
        if "unserialized" in job.meta:  # rq's placeholder for a meta it could not read
            raise DeserializationError("meta")
        return JobInfo(id=job.id, func=job.func_name, status=status,
                       meta=dict(job.meta or {}), result=result, error=error,
                       enqueued_at=job.enqueued_at, ended_at=job.ended_at)

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
                job = Job.fetch(raw.decode(), connection=self.redis, serializer=SERIALIZER)
                job.func_name  # noqa: B018 - a job hash that is not JSON fails here, before it runs
            except (NoSuchJobError, DeserializationError, ValueError) as exc:
                log.warning("interactive job %r skipped: %s", raw[:80], type(exc).__name__)
                continue
            _perform_inline(job)
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


def _perform_inline(job: Job) -> None:
    """Run an RQ job in the calling job's worker and store its outcome as RQ's worker would."""
    job.started_at = datetime.now(timezone.utc)
    try:
        job._result = json_data(job.perform(), "a job's result")
        failure = None
    except Exception:  # noqa: BLE001 - its failure is recorded; the job that served it carries on
        failure = traceback.format_exc()
        log.error("interactive job %s (%s) failed: %s", job.id, job.func_name, _error_line(failure))
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


# ---------------------------------------------------------------------------------------- embedded
@dataclass
class _LocalJob:
    info: JobInfo
    args: tuple
    kwargs: dict
    retries_left: int


class EmbeddedBackend:
    """One daemon thread running jobs in priority order ("bank" first), started lazily."""

    mode = "embedded"

    def __init__(self, history: int = EMBEDDED_HISTORY) -> None:
        self._pending: queue_mod.PriorityQueue = queue_mod.PriorityQueue()
        self._jobs: OrderedDict[str, _LocalJob] = OrderedDict()
        self._lock = threading.Lock()
        self._seq = itertools.count()
        self._history = history
        self._thread: threading.Thread | None = None
        self._local = threading.local()

    def enqueue(self, func_path: str, args: tuple, kwargs: dict, queue: str, job_id: str | None,
                meta: dict | None, retries: int, timeout: int | None) -> str:
        job_id = job_id or f"local-{next(self._seq)}-{time.monotonic_ns():x}"
        info = JobInfo(id=job_id, func=func_path, status="queued", meta=dict(meta or {}),
                       enqueued_at=datetime.now(timezone.utc))
        with self._lock:
            self._jobs.pop(job_id, None)
            self._jobs[job_id] = _LocalJob(info, tuple(args), dict(kwargs), max(0, retries))
            self._trim()
            self._pending.put((QUEUES.index(queue), next(self._seq), job_id))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="ntt-embedded-worker", daemon=True)
                self._thread.start()
        return job_id

    def _trim(self) -> None:
        """Forget the oldest finished jobs beyond the history bound (pending ones are kept)."""
        excess = len(self._jobs) - self._history
        for jid in [j for j, job in self._jobs.items() if job.info.done][:max(0, excess)]:
            del self._jobs[jid]

    def _run(self) -> None:
        while True:
            prio, _, job_id = self._pending.get()
            self._execute(prio, job_id)

    def serve_interactive(self) -> int:
        """Run the interactive jobs pending now, in the calling thread (a job of this worker)."""
        served = 0
        while True:
            with self._pending.mutex:  # the job's own threads may call this at once: pop atomically
                heap = self._pending.queue
                if not heap or heap[0][0] != _INTERACTIVE:
                    return served
                prio, _, job_id = heapq.heappop(heap)
            self._execute(prio, job_id)
            served += 1

    def _execute(self, prio: int, job_id: str) -> None:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job.info.status != "queued":
                return
            job.info.status = "started"
        outer = getattr(self._local, "job", None)  # the long job that serves an interactive one
        self._local.job = job.info
        try:
            result = json_data(_import(job.info.func)(*job.args, **job.kwargs), "a job's result")
        except Exception as exc:  # noqa: BLE001 - a job failure must not kill the worker thread
            log.error("job %s (%s) failed: %s", job_id, job.info.func, exc,
                      exc_info=log.isEnabledFor(logging.DEBUG))
            with self._lock:
                if job.retries_left > 0:
                    job.retries_left -= 1
                    job.info.status = "queued"
                    self._pending.put((prio, next(self._seq), job_id))
                else:
                    job.info.status = "failed"
                    job.info.error = _error_line("".join(traceback.format_exception_only(exc)))
                    job.info.ended_at = datetime.now(timezone.utc)
                    self._trim()
        else:
            with self._lock:
                job.info.result = result
                job.info.status = "finished"
                job.info.ended_at = datetime.now(timezone.utc)
                self._trim()
        finally:
            self._local.job = outer

    def update_current_meta(self, fields: dict) -> None:
        """Merge into the meta of the job the calling thread runs (no-op outside the worker thread)."""
        info = getattr(self._local, "job", None)
        if info is not None:
            with self._lock:
                info.meta.update(fields)

    def fetch(self, job_id: str) -> JobInfo | None:
        with self._lock:
            job = self._jobs.get(job_id)
            return _copy(job.info) if job else None

    def fetch_many(self, job_ids: list[str]) -> list[JobInfo | None]:
        return [self.fetch(job_id) for job_id in job_ids]

    def list_jobs(self, limit: int) -> list[JobInfo]:
        with self._lock:
            return [_copy(j.info) for j in reversed(self._jobs.values())][:limit]

    def health(self, max_age: float = 0.0) -> dict:
        with self._lock:
            counts = {name: 0 for name in QUEUES}
            for prio, _, jid in list(self._pending.queue):
                job = self._jobs.get(jid)
                if job is not None and job.info.status == "queued":
                    counts[QUEUES[prio]] += 1
        alive = self._thread is not None and self._thread.is_alive()
        return {"mode": self.mode, "ok": True, "queued": counts, "worker_started": alive}


def _copy(info: JobInfo) -> JobInfo:
    return JobInfo(info.id, info.func, info.status, dict(info.meta), info.result, info.error,
                   info.enqueued_at, info.ended_at)


# ---------------------------------------------------------------------------------------- API
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
            _backend = RQBackend(settings) if settings.redis_url else EmbeddedBackend()
            _backend_settings = settings
        return _backend


def enqueue(func_path: str, *args: Any, queue: str = "predict", job_id: str | None = None,
            meta: dict | None = None, retries: int = 2, timeout: int | None = None, **kwargs: Any) -> str:
    """Queue `func_path(*args, **kwargs)` on one of QUEUES; returns the job id.

    `retries` failed attempts are retried (RQ: after 5 s, 30 s, 120 s). `timeout` (s) defaults to
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


# ---------------------------------------------------------------------------------------- spool
class Spool:
    """Durable FIFO of jobs that could not be enqueued (Redis down): one JSON line per job.

    Appends are fsynced before the caller answers, so an accepted webhook survives a crash of the
    web process. A lock file (flock) serialises appends and replays across processes (gunicorn
    workers). Replay stops at the first job Redis refuses and keeps it and everything after it,
    so order is kept; a job enqueued twice after a crash mid-replay is harmless (jobs are idempotent).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / "jobs.jsonl"
        self._lock_path = self.directory / "spool.lock"

    def _locked(self):
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    @staticmethod
    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def append(self, func_path: str, args: list, queue: str, **enqueue_kwargs: Any) -> None:
        """Keep a job that could not be queued; `enqueue_kwargs` (timeout, meta, ...) are given to
        `enqueue` as they are when it is replayed."""
        line = json.dumps({"func": func_path, "args": args, "queue": queue, "kwargs": enqueue_kwargs,
                           "spooled_at": time.time()}) + "\n"
        fd = self._locked()
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
        finally:
            self._unlock(fd)

    def __len__(self) -> int:
        try:
            with open(self.path, encoding="utf-8") as f:
                return sum(1 for ln in f if ln.strip())
        except FileNotFoundError:
            return 0

    def pending(self) -> bool:
        try:
            return self.path.stat().st_size > 0
        except FileNotFoundError:
            return False

    def replay(self, submit: Callable[[dict], None]) -> int:
        """Submit spooled jobs in order; returns how many left the spool."""
        fd = self._locked()
        try:
            try:
                lines = [ln for ln in self.path.read_text(encoding="utf-8").splitlines() if ln.strip()]
            except FileNotFoundError:
                return 0
            done = 0
            try:
                for ln in lines:
                    try:
                        record = json.loads(ln)
                    except ValueError:  # a torn last line from a crash mid-append: drop it
                        log.warning("spool: dropping an unreadable line")
                        done += 1
                        continue
                    try:
                        submit(record)
                    except QueueUnavailable:
                        break
                    done += 1
            finally:
                atomic_write(self.path, "".join(ln + "\n" for ln in lines[done:]))
            return done
        finally:
            self._unlock(fd)


def submit_spooled(record: dict) -> None:
    """Enqueue one spooled record (raises QueueUnavailable while Redis is still down)."""
    kwargs = record.get("kwargs")
    if kwargs is None:  # a line spooled by an older version
        kwargs = {"timeout": record.get("timeout"), "retries": record.get("retries", 2)}
    enqueue(record["func"], *record["args"], queue=record["queue"], **kwargs)


class SpoolReplayer:
    """Background thread of the web process: every `interval` s, refresh the queue health snapshot
    (so /health never waits on a slow Redis) and, when Redis answers, replay the spool.

    It serves the app created with `settings` and ends once the process settings are replaced
    (runtime.configure/reset: tests build several apps in one process).
    """

    def __init__(self, spool: Spool, settings: Settings, interval: float = 1.0) -> None:
        self.spool = spool
        self.settings = settings
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()  # start() runs from every request's before_request
        self.replayed = 0

    def start(self) -> None:
        if self._thread is not None:
            return
        with self._start_lock:
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._run, name="ntt-spool-replay", daemon=True)
                self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def run_once(self) -> int:
        if not health(max_age=0).get("ok") or not self.spool.pending():
            return 0
        n = self.spool.replay(submit_spooled)
        if n:
            self.replayed += n
            log.info("spool: %d spooled job(s) enqueued", n)
        return n

    def _run(self) -> None:
        while not self._stop.wait(self.interval) and runtime.get_settings() is self.settings:
            try:
                self.run_once()
            except Exception:  # noqa: BLE001 - keep the thread alive; the next round retries
                log.exception("spool replay failed")
