"""RQ worker that loads SAM2 + DINOv2 once and runs every job in its own process (no fork per job).

    REDIS_URL=redis://redis:6379/0 python -m backend.queueing.worker                  # interactive + bank + predict + evaluate
    REDIS_URL=... python -m backend.queueing.worker --queues interactive predict      # an extra GPU for inference
    REDIS_URL=... python -m backend.queueing.worker --burst                           # drain the queues, then exit

Queues are listed in priority order: a click in the editor (interactive) first, then a bank update,
then waiting predictions. One worker per GPU; start more for throughput. The worker
(`NTTWorker`, backend/queueing/rq_worker.py) also runs rq's scheduler, which re-enqueues retries
after their backoff, requeues jobs of dead workers, and rides out Redis outages.
"""
from __future__ import annotations

import argparse
import logging
import sys
from urllib.parse import urlsplit

import redis
from rq import Queue

from backend import runtime
from backend.queueing.jobinfo import QUEUES, SERIALIZER
from backend.queueing.outages import OUTAGE, wait_for_redis
from backend.queueing.rq_worker import NTTWorker
from backend.settings import SettingsError

log = logging.getLogger("backend.queueing.worker")

__all__ = ["NTTWorker", "main"]


def _where(url: str) -> str:
    """host:port/db of a Redis URL, without credentials (for the log)."""
    parts = urlsplit(url)
    return f"{parts.hostname or 'localhost'}:{parts.port or 6379}{parts.path or ''}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backend.queueing.worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--queues", nargs="+", choices=QUEUES, default=list(QUEUES),
                        help="logical queues to serve, in priority order (default: interactive bank predict evaluate)")
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
    compile_s = engine.prepare()  # the compiled decoder, before the first job rather than inside it
    if compile_s:
        log.info("SAM2 decoder compiled in %.1f s", compile_s)

    connection = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=5)
    queues = [Queue(settings.queue_name(name), connection=connection, serializer=SERIALIZER) for name in args.queues]
    try:
        connection.ping()
    except OUTAGE as exc:
        log.warning("Redis %s unreachable (%s); waiting for it", _where(settings.redis_url), type(exc).__name__)
        wait_for_redis(connection)
    log.info("serving queues %s on Redis %s%s", [q.name for q in queues], _where(settings.redis_url),
             " (burst)" if args.burst else "")
    worker = NTTWorker(queues, connection=connection, heartbeat_s=settings.worker_heartbeat_s)
    worker.work(burst=args.burst, with_scheduler=True, logging_level=settings.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
