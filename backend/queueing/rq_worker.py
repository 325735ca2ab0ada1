"""`NTTWorker`: rq's SimpleWorker (the job runs in the process that already holds the engine; rq's
fork-per-job Worker would reload the models, or re-initialise CUDA, on every job), made to survive
dead workers and Redis outages.

A worker that dies mid-job (SIGKILL, OOM, lost machine) leaves its job "started". While a job runs,
a heartbeat thread renews its deadline every WORKER_HEARTBEAT_S, so the job is known abandoned ~3
beats after its worker died (SimpleWorker alone would wait for the whole job timeout), and the next
worker that starts or runs maintenance puts it back on its queue without spending one of its error
retries (meta "abandoned" counts this, and it is logged). Job functions are idempotent, so the part
that ran before the crash is harmless to repeat.

Redis may go away at any moment of the worker's life (idle in BLPOP, setting its state, mid-job,
writing a result, running maintenance). Every step of RQ's work loop runs under `_through_outages`:
a redis ConnectionError/TimeoutError makes the worker wait for Redis (PING with backoff, 0.5 s to
10 s), register itself again, restart RQ's scheduler if the outage killed it, and run the step
again. A job whose outcome the outage kept from Redis (still "started" under this worker, or popped
but never started) goes back to the front of its queue without spending a retry; a job that raised
a Redis connection error itself is treated the same way, not as failed.

Jobs are stored as JSON (backend.queueing.SERIALIZER), never pickled; a job hash that is not JSON is
failed with a DeserializationError (logged) and the worker carries on. Jobs run through
backend/queueing/execution.py, as in the embedded mode.
"""
from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from typing import Any

import redis
from rq import Queue, SimpleWorker
from rq import worker_registration
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.utils import current_timestamp, parse_composite_key
from rq.worker import WorkerStatus

from backend.queueing.execution import JSONJob
from backend.queueing.jobinfo import SERIALIZER
from backend.queueing.outages import OUTAGE, OutageSafeQueue, wait_for_redis

log = logging.getLogger("backend.queueing.worker")

MAX_ABANDONED = 3  # a job that took down its worker this often is left to RQ's retry/failure policy


class NTTWorker(SimpleWorker):
    """SimpleWorker with a heartbeat while a job runs and a requeue of jobs abandoned by dead workers."""

    def __init__(self, queues: list[Queue | str], *args, heartbeat_s: float = 10.0, **kwargs) -> None:
        queues = [OutageSafeQueue(q.name, connection=q.connection, serializer=SERIALIZER) if isinstance(q, Queue)
                  else q for q in queues]
        self.heartbeat_s = heartbeat_s
        # an idle worker wakes up (and may run maintenance) at least every worker_ttl - 15 s
        kwargs.setdefault("worker_ttl", max(30, math.ceil(6 * heartbeat_s)))
        kwargs.setdefault("maintenance_interval", max(5, math.ceil(6 * heartbeat_s)))
        kwargs.setdefault("serializer", SERIALIZER)
        kwargs.setdefault("job_class", JSONJob)
        kwargs.setdefault("queue_class", OutageSafeQueue)
        super().__init__(queues, *args, **kwargs)

    # ------------------------------------------------------------------ Redis outages
    def _through_outages(self, step: Callable, *args: Any, **kwargs: Any) -> Any:
        """step(*args, **kwargs), run again after each Redis outage it meets."""
        while True:
            try:
                return step(*args, **kwargs)
            except OUTAGE as exc:
                self._ride_out(exc)

    def _ride_out(self, exc: BaseException) -> None:
        """Wait for Redis, then register again (the hash may have expired, or Redis restarted empty)
        and restart RQ's scheduler if the outage killed it."""
        self.log.warning("Worker %s: Redis went away (%s: %s); waiting for it", self.name, type(exc).__name__, exc)
        while True:
            waited = wait_for_redis(self.connection, lambda: self._stop_requested)
            try:
                self._register_again()
                break
            except OUTAGE:
                continue
        self.log.warning("Worker %s: Redis is back after %.1f s; carrying on", self.name, waited)

    def _register_again(self) -> None:
        if self.birth_date is None:
            return  # not registered yet: bootstrap does it
        with self.connection.pipeline() as pipe:
            pipe.hset(self.key, mapping={**self.serialize(), "state": self.get_state()})
            worker_registration.register(self, pipe)
            pipe.expire(self.key, self.worker_ttl + 60)
            pipe.execute()
        if self.scheduler is not None and not (self.scheduler._process and self.scheduler._process.is_alive()):
            self.scheduler.release_locks()  # the dead scheduler's own locks, else held ~1 min
            self.scheduler.acquire_locks(auto_start=True)

    def bootstrap(self, *args: Any, **kwargs: Any) -> None:
        self._through_outages(super().bootstrap, *args, **kwargs)

    def register_birth(self) -> None:
        if self.birth_date is None:  # else a retry of bootstrap: _register_again wrote it
            super().register_birth()

    def check_for_suspension(self, burst: bool) -> None:
        self._through_outages(super().check_for_suspension, burst)

    def dequeue_job_and_maintain_ttl(self, timeout: int | None, max_idle_time: int | None = None):  # noqa: ANN201
        return self._through_outages(super().dequeue_job_and_maintain_ttl, timeout, max_idle_time)

    def heartbeat(self, timeout: int | None = None, pipeline=None) -> None:  # noqa: ANN001
        if pipeline is not None:  # queued on a pipeline: nothing is sent yet
            return super().heartbeat(timeout, pipeline)
        self._through_outages(super().heartbeat, timeout)

    def teardown(self) -> None:
        try:
            super().teardown()
        except OUTAGE as exc:
            self.log.warning("Worker %s: Redis unreachable at shutdown (%s); its registration expires by itself",
                             self.name, type(exc).__name__)

    def handle_exception(self, job: Job, *exc_info) -> None:  # noqa: ANN002
        """A job cut short by a Redis outage did not fail: let execute_job requeue it (up to
        MAX_ABANDONED times, so a job that keeps raising Redis errors meets RQ's retry policy)."""
        if isinstance(exc_info[1], OUTAGE) and int(job.meta.get("interrupted", 0)) < MAX_ABANDONED:
            raise exc_info[1]
        super().handle_exception(job, *exc_info)

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        """Deadline of a running job's execution: three beats."""
        return max(2, math.ceil(3 * self.heartbeat_s))

    def execute_job(self, job: Job, queue: Queue) -> None:
        execution = None
        try:
            execution = self.prepare_execution(job)
            stop = threading.Event()
            beat = threading.Thread(target=self._beat, args=(job, execution, stop), name="rq-heartbeat", daemon=True)
            beat.start()
            try:
                self.perform_job(job, queue, execution)
            finally:
                stop.set()
                beat.join()
        except OUTAGE as exc:
            self._ride_out(exc)
        self._through_outages(self._settle, job, queue, prepared=execution is not None)
        self._through_outages(self.set_state, WorkerStatus.IDLE)

    def _settle(self, job: Job, queue: Queue, prepared: bool) -> None:
        """Requeue `job` if an outage kept its outcome from Redis: its execution by this worker is
        still in the started registry (RQ removes it with the outcome, in one transaction), or it
        was dequeued but never prepared (`prepared` false) and is on no queue."""
        executions = list(self.executions.values())  # RQ drops the execution once the outcome is recorded
        registry = queue.started_job_registry.key
        if executions and self.connection.zscore(registry, executions[0].composite_key) is not None:
            job.meta["interrupted"] = int(job.meta.get("interrupted", 0)) + 1
            self._requeue(queue, job, executions[0].composite_key, executions[0].id, "was cut short by a Redis outage")
        elif not prepared and job.get_status(refresh=True) == JobStatus.QUEUED \
                and self.connection.lpos(queue.key, job.id) is None:
            self.connection.lrem(queue.intermediate_queue_key, 1, job.id)
            queue.enqueue_job(job, at_front=True)
            log.warning("job %s (%s) was dequeued as Redis went away; requeued on %s", job.id, job.description,
                        queue.name)
        self.executions.clear()

    def _beat(self, job: Job, execution, stop: threading.Event) -> None:
        while not stop.wait(self.heartbeat_s):
            try:
                self.maintain_heartbeats(job, execution)
            except redis.exceptions.RedisError as exc:
                self.log.warning("heartbeat of job %s failed: %s", job.id, type(exc).__name__)

    def run_maintenance_tasks(self) -> None:
        self._through_outages(self._maintain)

    def _maintain(self) -> None:
        self.requeue_abandoned()  # before RQ's registry cleanup, which would fail them or spend a retry
        super().run_maintenance_tasks()

    def requeue_abandoned(self, now: int | None = None) -> int:
        """Put jobs whose execution deadline passed (their worker died) back on their queue;
        deadlines are judged at `now` (RQ's integer timestamp; default: the current time)."""
        requeued = 0
        for queue in self.queues:
            registry = queue.started_job_registry
            for entry in self.connection.zrangebyscore(registry.key, 0, current_timestamp() if now is None else now):
                job_id, execution_id = parse_composite_key(entry.decode() if isinstance(entry, bytes) else entry)
                try:
                    job = Job.fetch(job_id, connection=self.connection, serializer=self.serializer)
                except NoSuchJobError:
                    continue
                abandoned = int(job.meta.get("abandoned", 0))
                if job.get_status(refresh=False) != JobStatus.STARTED or abandoned >= MAX_ABANDONED:
                    continue  # RQ's cleanup handles these
                job.meta["abandoned"] = abandoned + 1
                requeued += self._requeue(queue, job, entry, execution_id,
                                          f"was abandoned by a dead worker (abandoned {abandoned + 1} time(s))")
        return requeued

    def _requeue(self, queue: Queue, job: Job, entry: str, execution_id: str, why: str) -> bool:
        """Move `job` from its started registry `entry` back to the front of `queue`, once."""
        if not self.connection.zrem(queue.started_job_registry.key, entry):
            return False  # another worker took it
        # forget the execution: its hash expires, and Job.delete() fails on a dangling entry
        self.connection.zrem(job.execution_registry.key, execution_id)
        job.save_meta()
        queue.enqueue_job(job, at_front=True)
        log.warning("job %s (%s) %s; requeued on %s", job.id, job.description, why, queue.name)
        return True
