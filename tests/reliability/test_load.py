"""Load on loopback, through the production server model: the web app in gunicorn started as
scripts/run_backend.sh starts it (backend/web/gunicorn_conf.py: one process, WEB_THREADS threads), RQ
on a private redis-server, and one RQ SimpleWorker (in a thread of this process) running fake jobs,
so the figures are those of the web layer and the queue.

* 60 s of concurrent /predict batches (20 ms per prediction), webhooks, /health and /setup.
  Request counts are bounded per client. Asserted: 0 failed requests, p99 of /health and /setup
  under 100 ms; the p50/p99 of every route are printed (docs/operations.md quotes them).
  NTT_LOAD_SECONDS shortens the run for a quick local check.
* 16 concurrent /predict calls whose jobs cannot finish (they wait on an event the test holds):
  /health and /setup are answered while all of them are still held.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import requests
from rq import Queue, SimpleWorker
from rq.timeouts import TimerDeathPenalty

from backend import queueing
from backend.settings import Settings
from tests.reliability.conftest import CONFIG_XML, ROOT, FakeJobs, free_port, mark_bank_filled, wait_for

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


@contextmanager
def rq_worker(settings: Settings, conn):
    """One ThreadWorker on both queues of `settings`, running the (fake) jobs in this process."""
    worker = ThreadWorker([Queue(settings.queue_name(q), connection=conn, serializer=queueing.SERIALIZER)
                           for q in queueing.QUEUES],
                          connection=conn, serializer=queueing.SERIALIZER)
    thread = threading.Thread(target=worker.work, kwargs={"logging_level": "WARNING"}, daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        worker._stop_requested = True
        queueing.enqueue("backend.jobs.refresh.refresh_project", PID, queue="predict")  # wakes it up to stop
        thread.join(10)


@contextmanager
def gunicorn_web(redis_url: str, workdir: Path, **env: str):
    """The web process as scripts/run_backend.sh starts it (same gunicorn config), on a free
    loopback port, with REDIS_URL; yields its base URL. Its log is printed if the test fails."""
    port = free_port()
    log_path = workdir / "gunicorn.log"
    environ = {**os.environ, "REDIS_URL": redis_url, "MODEL_DIR": str(workdir / "web"), "LOG_LEVEL": "WARNING",
               **env}
    cmd = [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--config", "python:backend.web.gunicorn_conf",
           "--no-control-socket", "_wsgi:app"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=environ, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, f"gunicorn exited:\n{log_path.read_text()[-3000:]}"
        try:
            return requests.get(base + "/health", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    try:
        wait_for(up, 60, "gunicorn to answer /health")
        yield base
    except BaseException:
        print(log_path.read_text()[-5000:])
        raise
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _predict_body(n: int) -> dict:
    return {"project": f"{PID}.1717", "label_config": CONFIG_XML,
            "tasks": [{"id": n * TASKS_PER_BATCH + i, "data": {"image": f"/data/upload/1/{n}-{i}.png"}}
                      for i in range(TASKS_PER_BATCH)]}


def _webhook_body(n: int) -> dict:
    return {"action": "ANNOTATION_UPDATED", "project": {"id": PID, "label_config": CONFIG_XML},
            "annotation": {"id": n, "task": 1, "result": []}, "task": {"id": 1, "data": {"image": "/x.png"}}}


def test_sixty_seconds_of_concurrent_traffic(make_app, fake_jobs, private_redis, tmp_path):
    fake_jobs.delay_s = 0.02
    server = private_redis()
    app = make_app(redis_url=server.url)
    settings = app.extensions["ntt"].settings
    mark_bank_filled(PID)

    latencies: dict[str, list[float]] = defaultdict(list)
    failures: list[str] = []
    lock = threading.Lock()
    deadline = 0.0  # set when the clients start, after the web and worker are up

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

    with rq_worker(settings, server.client()), \
            gunicorn_web(server.url, tmp_path, PREDICT_BUDGET_S="20") as base:
        threads = [threading.Thread(target=client, args=(kind, i, base))
                   for kind, (count, _, _) in CLIENTS.items() for i in range(count)]
        t0 = time.monotonic()
        deadline = t0 + DURATION_S
        for t in threads:
            t.start()
        for t in threads:
            t.join(DURATION_S + 60)
        elapsed = time.monotonic() - t0

    print(f"\nload: {elapsed:.0f} s, {sum(map(len, latencies.values()))} requests, "
          f"{len(fake_jobs.calls)} jobs run, {len(failures)} failed")
    print(f"{'route':<14} {'requests':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for route, values in sorted(latencies.items()):
        ms = np.array(values) * 1000
        print(f"{route:<14} {len(ms):>8} {np.percentile(ms, 50):>8.1f} {np.percentile(ms, 99):>8.1f} {ms.max():>8.1f}")
    assert failures == []
    assert elapsed >= DURATION_S - 1
    for route in ("GET /health", "POST /setup"):
        # the figures are printed above; the bound is Label Studio's own /health timeout (1 s), not
        # this machine's speed, so a busy CI machine cannot fail it by chance
        assert len(latencies[route]) > 100 and np.percentile(latencies[route], 99) < 1.0, route
    assert len(latencies["POST /predict"]) > 10 and len(latencies["POST /webhook"]) > 10


SLOW_CALLS = 16


def test_health_answers_while_sixteen_slow_predict_calls_are_held(make_app, fake_jobs, private_redis, tmp_path,
                                                                  monkeypatch):
    """LS opening 16 tasks of slow images at once must not starve /health (its timeout: 1 s).
    The jobs wait on `gate`: none finishes while /health and /setup are asked. At most
    WEB_THREADS - 2 calls wait for results; the others answer at once with "deferred" items
    (the workers post those predictions through the LS API later)."""
    server = private_redis()
    settings = make_app(redis_url=server.url).extensions["ntt"].settings
    mark_bank_filled(PID)
    gate = threading.Event()

    def slow_predict(pid, task_id, image_url, config_hash, delivery_key=None, warm=False):
        assert gate.wait(120), "the test never released the jobs"
        return FakeJobs.predict_task(fake_jobs, pid, task_id, image_url, config_hash, delivery_key, warm)

    monkeypatch.setattr(fake_jobs.modules["backend.jobs.predict"], "predict_task", slow_predict)
    answers: dict[int, dict] = {}
    lock = threading.Lock()

    def call(base: str, n: int) -> None:
        body = {"project": f"{PID}.1717", "label_config": CONFIG_XML,
                "tasks": [{"id": n, "data": {"image": f"/data/upload/1/slow-{n}.jpg"}}]}
        resp = requests.post(base + "/predict", json=body, timeout=120)
        with lock:
            answers[n] = {"status": resp.status_code, **resp.json()}

    def answered() -> int:
        with lock:
            return len(answers)

    conn = server.client()
    predict_queue = Queue(settings.queue_name("predict"), connection=conn, serializer=queueing.SERIALIZER)
    waiting = settings.predict_waiting_calls
    assert settings.web_threads == 8 and waiting == 6  # the thread count scripts/run_backend.sh starts with
    with rq_worker(settings, conn), gunicorn_web(server.url, tmp_path, PREDICT_BUDGET_S="90") as base:
        try:
            callers = [threading.Thread(target=call, args=(base, n), daemon=True) for n in range(SLOW_CALLS)]
            for t in callers:
                t.start()
            # every call has enqueued its job (none can finish: the worker is stuck in the first one) ...
            wait_for(lambda: predict_queue.count + predict_queue.started_job_registry.count == SLOW_CALLS, 60,
                     "all 16 prediction jobs")
            # ... and the calls over the bound answered without waiting for them
            wait_for(lambda: answered() >= SLOW_CALLS - waiting, 60, "the calls over the bound to answer")
            latencies = []
            for _ in range(5):
                t = time.perf_counter()
                health = requests.get(base + "/health", timeout=5)
                latencies.append(time.perf_counter() - t)
                assert health.status_code == 200 and health.json()["status"] == "UP"
            setup = requests.post(base + "/setup", json={"project": f"{PID}.1717", "schema": CONFIG_XML}, timeout=5)
            assert setup.status_code == 200
            # all of this while the waiting calls were provably still held: their jobs cannot have finished
            assert answered() == SLOW_CALLS - waiting and not gate.is_set()
            print(f"\n/health while {waiting} /predict calls wait and {SLOW_CALLS - waiting} were handed over: "
                  f"{', '.join(f'{s * 1000:.0f}' for s in latencies)} ms")
            metrics = requests.get(base + "/metrics", timeout=5).json()
        finally:
            gate.set()
        for t in callers:
            t.join(60)

    assert answered() == SLOW_CALLS
    deferred = [n for n, a in answers.items() if a["results"][0].get("status") == "deferred"]
    waited = [n for n, a in answers.items() if isinstance(a["results"][0].get("result"), list)]
    assert len(deferred) == SLOW_CALLS - waiting and len(waited) == waiting
    assert all(a["status"] == 200 and "result" not in a["results"][0] for n, a in answers.items() if n in deferred)
    assert metrics["predict_calls_not_waited"] == SLOW_CALLS - waiting
    assert metrics["predictions_deferred"] == SLOW_CALLS - waiting
