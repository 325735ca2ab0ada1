"""Load on loopback: concurrent /predict batches, webhooks, /health and /setup for 60 s.

The production shape, minus the models: the web app on a real threaded HTTP server (werkzeug),
RQ on a private redis-server, and one RQ SimpleWorker (in a thread of this process) running fast
fake jobs (20 ms per prediction), so the figures are those of the web layer and the queue.
Request counts are bounded per client. Asserted: 0 failed requests, p99 of /health and /setup
under 100 ms; the p50/p99 of every route are printed (docs/operations.md quotes them).
NTT_LOAD_SECONDS shortens the run for a quick local check.
"""
from __future__ import annotations

import os
import threading
import time
from collections import defaultdict

import numpy as np
import requests
from rq import Queue, SimpleWorker
from rq.timeouts import TimerDeathPenalty

from backend import queueing
from tests.reliability.conftest import CONFIG_XML, mark_bank_filled, serving

PID = 1
DURATION_S = float(os.environ.get("NTT_LOAD_SECONDS", "60"))
TASKS_PER_BATCH = 8
# client kind -> (threads, pause between requests in s, max requests per thread)
CLIENTS = {"predict": (3, 0.2, 400), "webhook": (2, 0.5, 150), "probe": (2, 0.05, 1500)}


class ThreadWorker(SimpleWorker):
    """An RQ SimpleWorker that can run in a thread (no signal handlers, timer-based job timeouts)."""

    death_penalty_class = TimerDeathPenalty

    def _install_signal_handlers(self) -> None:
        pass


def _predict_body(n: int) -> dict:
    return {"project": f"{PID}.1717", "label_config": CONFIG_XML,
            "tasks": [{"id": n * TASKS_PER_BATCH + i, "data": {"image": f"/data/upload/1/{n}-{i}.png"}}
                      for i in range(TASKS_PER_BATCH)]}


def _webhook_body(n: int) -> dict:
    return {"action": "ANNOTATION_UPDATED", "project": {"id": PID, "label_config": CONFIG_XML},
            "annotation": {"id": n, "task": 1, "result": []}, "task": {"id": 1, "data": {"image": "/x.png"}}}


def test_sixty_seconds_of_concurrent_traffic(make_app, fake_jobs, private_redis):
    fake_jobs.delay_s = 0.02
    server = private_redis()
    app = make_app(redis_url=server.url, predict_budget_s=20.0)
    settings = app.extensions["ntt"]["settings"]
    mark_bank_filled(PID)
    conn = server.client()
    worker = ThreadWorker([Queue(settings.queue_name(q), connection=conn, serializer=queueing.SERIALIZER)
                           for q in queueing.QUEUES], connection=conn, serializer=queueing.SERIALIZER)
    worker_thread = threading.Thread(target=worker.work, kwargs={"logging_level": "WARNING"}, daemon=True)
    worker_thread.start()

    latencies: dict[str, list[float]] = defaultdict(list)
    failures: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + DURATION_S

    def record(route: str, seconds: float, problem: str | None) -> None:
        with lock:
            latencies[route].append(seconds)
            if problem:
                failures.append(f"{route}: {problem}")

    def call(session: requests.Session, route: str, method: str, url: str, expect: int, check=None, **kw) -> None:
        t = time.perf_counter()
        try:
            resp = session.request(method, url, timeout=30, **kw)
            problem = None if resp.status_code == expect else f"HTTP {resp.status_code} {resp.text[:200]}"
            if problem is None and check is not None:
                problem = check(resp.json())
        except requests.RequestException as exc:
            problem = type(exc).__name__
        record(route, time.perf_counter() - t, problem)

    def predictions_ok(body: dict) -> str | None:
        items = body["results"]
        ok = len(items) == TASKS_PER_BATCH and all(isinstance(i.get("result"), list) for i in items)
        return None if ok else f"bad items {items[:2]}"

    def client(kind: str, index: int, base: str) -> None:
        _, pause, limit = CLIENTS[kind]
        with requests.Session() as s:
            for n in range(limit):
                if time.monotonic() >= deadline:
                    return
                if kind == "predict":
                    call(s, "POST /predict", "POST", base + "/predict", 200, predictions_ok,
                         json=_predict_body(index * limit + n))
                elif kind == "webhook":
                    call(s, "POST /webhook", "POST", base + "/webhook", 201, json=_webhook_body(index * limit + n))
                else:
                    call(s, "GET /health", "GET", base + "/health", 200,
                         lambda b: None if b["redis"] == "ok" and b["ready"] else f"not ready: {b}")
                    call(s, "POST /setup", "POST", base + "/setup", 200,
                         json={"project": f"{PID}.1717", "schema": CONFIG_XML})
                time.sleep(pause)

    try:
        with serving(app) as base:
            threads = [threading.Thread(target=client, args=(kind, i, base))
                       for kind, (count, _, _) in CLIENTS.items() for i in range(count)]
            t0 = time.monotonic()
            for t in threads:
                t.start()
            for t in threads:
                t.join(DURATION_S + 60)
            elapsed = time.monotonic() - t0
    finally:
        worker._stop_requested = True
        queueing.enqueue("backend.jobs.refresh_project", PID, queue="predict")  # wakes it up to stop
        worker_thread.join(10)

    print(f"\nload: {elapsed:.0f} s, {sum(map(len, latencies.values()))} requests, "
          f"{len(fake_jobs.calls)} jobs run, {len(failures)} failed")
    print(f"{'route':<14} {'requests':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for route, values in sorted(latencies.items()):
        ms = np.array(values) * 1000
        print(f"{route:<14} {len(ms):>8} {np.percentile(ms, 50):>8.1f} {np.percentile(ms, 99):>8.1f} {ms.max():>8.1f}")
    assert failures == []
    assert elapsed >= DURATION_S - 1
    for route in ("GET /health", "POST /setup"):
        assert len(latencies[route]) > 100 and np.percentile(latencies[route], 99) < 0.100, route
    assert len(latencies["POST /predict"]) > 10 and len(latencies["POST /webhook"]) > 10
