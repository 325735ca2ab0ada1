"""Riding out Redis outages in an RQ worker (backend/queueing/rq_worker.py): waiting for Redis to
answer again, and putting back on its queue a job popped while Redis went away."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

import redis
from rq import Queue
from rq.exceptions import StopRequested
from rq.job import Job

log = logging.getLogger("backend.queueing.worker")

OUTAGE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
RECONNECT_BACKOFF_S = (0.5, 10.0)  # first and longest wait between two PINGs while Redis is away


def wait_for_redis(connection: redis.Redis, stop: Callable[[], bool] = lambda: False) -> float:
    """Block until Redis answers a PING (backoff 0.5 s .. 10 s); returns the seconds waited.
    Raises StopRequested once `stop()` is true."""
    t0, delay = time.monotonic(), RECONNECT_BACKOFF_S[0]
    while True:
        try:
            if stop():
                raise StopRequested()
            time.sleep(delay)
            connection.ping()
            return time.monotonic() - t0
        except OUTAGE:
            delay = min(2 * delay, RECONNECT_BACKOFF_S[1])


def requeue_orphans(connection: redis.Redis, queues: list[Queue]) -> int:
    """Put back on the front of its queue every job of `queues` that is "queued" yet on no queue:
    popped by a BLPOP whose reply an outage lost. Scans the job hashes: run after outages only.
    (A job another worker popped this very moment is requeued too and runs twice: jobs are idempotent.)"""
    by_name = {q.name: q for q in queues}
    requeued = 0
    for key in connection.scan_iter(match=f"{Job.redis_job_namespace_prefix}*", count=1000, _type="HASH"):
        status, origin = connection.hmget(key, "status", "origin")
        queue = by_name.get(origin.decode()) if origin else None
        job_id = key.decode()[len(Job.redis_job_namespace_prefix):]
        if status != b"queued" or queue is None or connection.lpos(queue.key, job_id) is not None \
                or connection.lpos(queue.intermediate_queue_key, job_id) is not None:
            continue
        connection.lpush(queue.key, job_id)
        requeued += 1
        log.warning("job %s was popped from %s as Redis went away and never reached a worker; requeued",
                    job_id, queue.name)
    return requeued


class OutageSafeQueue(Queue):
    """Queue whose dequeue never loses a job it popped when Redis goes away meanwhile."""

    @classmethod
    def dequeue_any(cls, queues, timeout, connection, **kwargs):  # noqa: ANN001, ANN206 - rq's signature
        try:
            return super().dequeue_any(queues, timeout, connection, **kwargs)
        except OUTAGE as exc:
            job_id, queue = getattr(exc, "job_id", None), getattr(exc, "queue", None)  # rq names what it popped
            wait_for_redis(connection)
            if job_id is not None and queue is not None:  # popped, then the fetch failed
                connection.lpush(queue.key, job_id)
                log.warning("job %s went back to the front of %s: Redis went away as it was dequeued",
                            job_id, queue.name)
            else:  # the BLPOP itself: Redis may have popped a job whose reply never arrived
                requeue_orphans(connection, list(queues))
            raise
