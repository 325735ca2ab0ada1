"""RQ worker that loads SAM2 + DINOv2 once and runs every job in its own process (no fork per job).

    REDIS_URL=redis://redis:6379/0 python -m backend.worker                  # bank + predict
    REDIS_URL=... python -m backend.worker --queues predict                  # an extra GPU for inference
    REDIS_URL=... python -m backend.worker --burst                           # drain the queues, then exit

Queues are listed in priority order (a bank update is taken before waiting predictions). One
worker per GPU; start more for throughput. rq's fork-per-job Worker would reload (or re-initialise
CUDA for) the models on every job, so `NTTWorker` is rq's SimpleWorker: the job runs in the process
that already holds the engine. The worker also runs rq's scheduler, which re-enqueues retries after
their backoff.

A worker that dies mid-job (SIGKILL, OOM, lost machine) leaves its job "started". While a job runs,
a heartbeat thread renews its deadline every WORKER_HEARTBEAT_S, so the job is known abandoned ~3
beats after its worker died (SimpleWorker alone would wait for the whole job timeout), and the next
worker that starts or runs maintenance puts it back on its queue without spending one of its error
retries (meta "abandoned" counts this, and it is logged). Job functions are idempotent, so the part
that ran before the crash is harmless to repeat.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
import threading
from urllib.parse import urlsplit

import redis
from rq import Queue, SimpleWorker
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.utils import current_timestamp, parse_composite_key
from rq.worker import WorkerStatus

from backend import runtime
from backend.queueing import QUEUES
from backend.settings import SettingsError

log = logging.getLogger("backend.worker")

MAX_ABANDONED = 3  # a job that took down its worker this often is left to RQ's retry/failure policy


class NTTWorker(SimpleWorker):
    """SimpleWorker with a heartbeat while a job runs and a requeue of jobs abandoned by dead workers."""

    def __init__(self, *args, heartbeat_s: float = 10.0, **kwargs) -> None:
        self.heartbeat_s = heartbeat_s
        # an idle worker wakes up (and may run maintenance) at least every worker_ttl - 15 s
        kwargs.setdefault("worker_ttl", max(30, math.ceil(6 * heartbeat_s)))
        kwargs.setdefault("maintenance_interval", max(5, math.ceil(6 * heartbeat_s)))
        super().__init__(*args, **kwargs)

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        """Deadline of a running job's execution: three beats."""
        return max(2, math.ceil(3 * self.heartbeat_s))

    def execute_job(self, job: Job, queue: Queue) -> None:
        execution = self.prepare_execution(job)
        stop = threading.Event()
        beat = threading.Thread(target=self._beat, args=(job, execution, stop), name="rq-heartbeat", daemon=True)
        beat.start()
        try:
            self.perform_job(job, queue, execution)
        finally:
            stop.set()
            beat.join()
        self.set_state(WorkerStatus.IDLE)

    def _beat(self, job: Job, execution, stop: threading.Event) -> None:
        while not stop.wait(self.heartbeat_s):
            try:
                self.maintain_heartbeats(job, execution)
            except redis.exceptions.RedisError as exc:
                self.log.warning("heartbeat of job %s failed: %s", job.id, type(exc).__name__)

    def run_maintenance_tasks(self) -> None:
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
                    job = Job.fetch(job_id, connection=self.connection)
                except NoSuchJobError:
                    continue
                abandoned = int(job.meta.get("abandoned", 0))
                if job.get_status(refresh=False) != JobStatus.STARTED or abandoned >= MAX_ABANDONED:
                    continue  # RQ's cleanup handles these
                if not self.connection.zrem(registry.key, entry):
                    continue  # another worker took it
                # forget the dead execution: its hash expires, and Job.delete() fails on a dangling entry
                self.connection.zrem(job.execution_registry.key, execution_id)
                job.meta["abandoned"] = abandoned + 1
                job.save_meta()
                queue.enqueue_job(job, at_front=True)
                requeued += 1
                log.warning("job %s (%s) was abandoned by a dead worker; requeued on %s (abandoned %d time(s))",
                            job.id, job.func_name, queue.name, abandoned + 1)
        return requeued


def _where(url: str) -> str:
    """host:port/db of a Redis URL, without credentials (for the log)."""
    parts = urlsplit(url)
    return f"{parts.hostname or 'localhost'}:{parts.port or 6379}{parts.path or ''}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backend.worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--queues", nargs="+", choices=QUEUES, default=list(QUEUES),
                        help="logical queues to serve, in priority order (default: bank predict)")
    parser.add_argument("--burst", action="store_true", help="exit when the queues are empty")
    args = parser.parse_args(argv)

    try:
        settings = runtime.get_settings()
    except SettingsError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not settings.redis_url:
        log.error("REDIS_URL is not set: without Redis the web process runs the jobs itself "
                  "(embedded mode) and no worker is needed")
        return 2

    engine = runtime.get_engine()  # load once, before the first job
    log.info("engine %s loaded on %s (checkpoints: %s; random weights: %s)", engine.name, engine.device,
             "none" if settings.random_weights else f"{settings.sam_checkpoint}, {settings.dino_checkpoint}",
             settings.random_weights)

    connection = redis.Redis.from_url(settings.redis_url)
    queues = [Queue(settings.queue_name(name), connection=connection) for name in args.queues]
    log.info("serving queues %s on Redis %s%s", [q.name for q in queues], _where(settings.redis_url),
             " (burst)" if args.burst else "")
    worker = NTTWorker(queues, connection=connection, heartbeat_s=settings.worker_heartbeat_s)
    worker.work(burst=args.burst, with_scheduler=True, logging_level=settings.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
