"""backend.queueing: the embedded worker thread, RQ on the real Redis, and the webhook spool."""
from __future__ import annotations

import base64
import json
import os
import pickle
import threading
import time
import uuid
import zlib
from dataclasses import replace
from datetime import datetime

import pytest
import redis
from rq import SimpleWorker
from rq.job import Job
from rq.utils import current_timestamp

from backend import runtime
from backend import queueing
from backend.settings import Settings
from backend.queueing.worker import NTTWorker
from tests.backend.fixtures import purge_queues
from tests.backend.queue_jobs import CALLS, GATE, ORDER, PATH as JOBS, STARTED, FakeClock, record
from tests.helpers import wait_for

MOD = __name__  # jobs below are referenced by import path, like backend.jobs functions


def wait_done(job_id: str, timeout: float = 10.0) -> queueing.JobInfo:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        info = queueing.fetch(job_id)
        if info is not None and info.done:
            return info
        time.sleep(0.01)
    raise AssertionError(f"job {job_id} not done after {timeout} s: {queueing.fetch(job_id)}")


# --------------------------------------------------------------------------------------- embedded
def test_a_second_process_on_the_same_queue_file_is_refused(tmp_path):
    """Two processes on one embedded queue would requeue each other's running jobs: the second
    one is refused, with a message that says what to do, and takes the file once the first exits."""
    import subprocess
    import sys
    from backend.queueing.jobdb import QueueInUse
    from backend.web.app import create_app
    path = tmp_path / "state" / "queue.sqlite3"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; from backend.queueing.embedded import "
         f"EmbeddedBackend; EmbeddedBackend(Path({str(path)!r})); print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(QueueInUse, match=rf"pid {holder.pid}\).*set REDIS_URL"):
            queueing.EmbeddedBackend(path)
        with pytest.raises(QueueInUse):
            create_app(Settings.from_env({"MODEL_DIR": str(tmp_path)}))
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
        runtime.reset()
    backend = queueing.EmbeddedBackend(path)  # the first process is gone: its lock with it
    assert backend.health()["ok"]
    assert queueing.EmbeddedBackend(path).health()["ok"]  # this process holds it: opening it again is fine


@pytest.fixture
def embedded(monkeypatch):
    monkeypatch.setattr(queueing, "_backend", queueing.EmbeddedBackend(clock=FakeClock()))
    monkeypatch.setattr(queueing, "_backend_settings", runtime.get_settings())
    assert runtime.get_settings().redis_url is None
    ORDER.clear()
    CALLS.clear()
    GATE.clear()
    STARTED.clear()
    yield queueing._backend
    GATE.set()


def test_embedded_worker_starts_lazily_and_runs_by_import_path(embedded):
    assert queueing.health()["worker_started"] is False
    job_id = queueing.enqueue(f"{JOBS}.add", 2, b=3, queue="predict", meta={"project": 7})
    info = wait_done(job_id)
    assert (info.status, info.result, info.error, info.meta) == ("finished", 5, None, {"project": 7})
    assert info.func == f"{JOBS}.add" and info.enqueued_at <= info.ended_at
    assert [m.result if m else None for m in queueing.fetch_many([job_id, "nope"])] == [5, None]
    assert queueing.health() == {"mode": "embedded", "ok": True, "queued": {"interactive": 0, "bank": 0, "predict": 0, "evaluate": 0},
                                 "worker_started": True}


def test_embedded_bank_jobs_run_before_waiting_predict_jobs(embedded):
    first = queueing.enqueue(f"{JOBS}.hold", "busy", queue="predict")
    assert STARTED.wait(10)  # the thread is now inside `first`
    p1 = queueing.enqueue(f"{JOBS}.record", "p1", queue="predict")
    p2 = queueing.enqueue(f"{JOBS}.record", "p2", queue="predict")
    b1 = queueing.enqueue(f"{JOBS}.record", "b1", queue="bank")
    assert queueing.health()["queued"] == {"interactive": 0, "bank": 1, "predict": 2, "evaluate": 0}
    assert queueing.fetch(first).status == "started" and queueing.fetch(b1).status == "queued"
    GATE.set()
    for job in (first, p1, p2, b1):
        wait_done(job)
    assert ORDER == ["busy", "b1", "p1", "p2"]


def test_embedded_failure_keeps_only_the_error_line(embedded):
    info = wait_done(queueing.enqueue(f"{JOBS}.boom", "bad input", retries=0))
    assert (info.status, info.error, info.result) == ("failed", "ValueError: bad input", None)


def test_embedded_progress_meta(embedded):
    info = wait_done(queueing.enqueue(f"{JOBS}.progress", 4, queue="bank", meta={"event": "START_TRAINING"}))
    assert info.meta == {"event": "START_TRAINING", "done": 4, "total": 4}


def test_embedded_history_is_bounded_newest_first(monkeypatch):
    monkeypatch.setattr(queueing, "_backend", queueing.EmbeddedBackend(history=3))
    monkeypatch.setattr(queueing, "_backend_settings", runtime.get_settings())
    ids = [queueing.enqueue(f"{JOBS}.add", i) for i in range(5)]
    wait_done(ids[-1])
    jobs = queueing.list_jobs(10)
    assert [j.id for j in jobs] == ids[:-4:-1]
    assert [j.result for j in jobs] == [4, 3, 2]
    assert queueing.fetch(ids[0]) is None


def test_unknown_queue_is_refused(embedded):
    with pytest.raises(ValueError, match="unknown queue 'gpu'"):
        queueing.enqueue(f"{JOBS}.add", 1, queue="gpu")


# --------------------------------------------------------------------------------------- RQ
@pytest.fixture
def rq_settings():
    prefix = f"qtest-{uuid.uuid4().hex[:8]}"
    settings = replace(Settings.from_env(), redis_url=os.environ["NTT_TEST_REDIS_URL"], queue_prefix=prefix)
    runtime.reset()
    runtime.configure(settings=settings)
    yield settings
    purge_queues(settings)
    runtime.reset()


def run_burst(settings: Settings) -> None:
    conn = redis.Redis.from_url(settings.redis_url)
    worker = SimpleWorker([queueing.backend().queues[q] for q in queueing.QUEUES], connection=conn,
                          serializer=queueing.SERIALIZER)
    worker.work(burst=True)


def test_rq_enqueue_fetch_health_and_meta(rq_settings):
    assert queueing.backend().mode == "rq"
    ok = queueing.enqueue(f"{JOBS}.add", 20, b=22, queue="predict", meta={"project": 3})
    bad = queueing.enqueue(f"{JOBS}.boom", "no image", queue="bank", retries=0)
    prog = queueing.enqueue(f"{JOBS}.progress", 3, queue="bank")
    health = queueing.health(max_age=0)
    assert health["ok"] is True and health["queued"] == {"interactive": 0, "bank": 2, "predict": 1, "evaluate": 0}
    assert queueing.fetch(ok).status == "queued"

    run_burst(rq_settings)

    info = queueing.fetch(ok)
    assert (info.status, info.result, info.meta, info.error) == ("finished", 42, {"project": 3}, None)
    failed = queueing.fetch(bad)
    assert (failed.status, failed.error) == ("failed", "ValueError: no image")
    assert queueing.fetch(prog).meta == {"done": 3, "total": 3}
    assert queueing.health(max_age=0)["queued"] == {"interactive": 0, "bank": 0, "predict": 0, "evaluate": 0}
    assert {j.id for j in queueing.list_jobs(10)} == {ok, bad, prog}
    assert queueing.fetch("no-such-job") is None
    many = queueing.fetch_many([ok, "no-such-job", bad])
    assert [(m.id, m.status) if m else None for m in many] == [(ok, "finished"), None, (bad, "failed")]


def test_rq_job_options(rq_settings):
    wanted = f"fixed-{uuid.uuid4().hex}"
    job_id = queueing.enqueue(f"{JOBS}.add", 1, queue="bank", retries=2, timeout=77, job_id=wanted)
    job = Job.fetch(job_id, connection=queueing.backend().redis, serializer=queueing.SERIALIZER)
    assert job_id == wanted
    assert (job.retries_left, job.retry_intervals, job.timeout) == (2, [5, 30], 77)
    assert (job.result_ttl, job.failure_ttl) == (queueing.RESULT_TTL_S, queueing.FAILURE_TTL_S)
    assert job.origin == f"{rq_settings.queue_prefix}-bank"
    default = Job.fetch(queueing.enqueue(f"{JOBS}.add", 1, retries=0), connection=queueing.backend().redis,
                        serializer=queueing.SERIALIZER)
    assert (default.timeout, default.retries_left, default.origin) == (
        rq_settings.job_timeout_s, None, f"{rq_settings.queue_prefix}-predict")


def _worker() -> NTTWorker:
    return NTTWorker(list(queueing.backend().queues.values()), connection=queueing.backend().redis,
                     heartbeat_s=0.5)  # execution deadline: 2 s without a beat


def execution_deadline(job_id: str, queue: str) -> int:
    """The deadline of the job's execution in its started registry (RQ's integer timestamp)."""
    registry = queueing.backend().queues[queue].started_job_registry
    (score,) = [s for e, s in queueing.backend().redis.zrange(registry.key, 0, -1, withscores=True)
                if e.decode().startswith(job_id + ":")]
    return int(score)


def test_abandoned_job_is_requeued_without_spending_a_retry(rq_settings):
    job_id = queueing.enqueue(f"{JOBS}.add", 1, 2, queue="bank", retries=1)
    dead = _worker()
    job, _ = dead.dequeue_job_and_maintain_ttl(timeout=1)
    before = current_timestamp()
    dead.prepare_execution(job)
    dead.prepare_job_execution(job)  # ... and the worker is SIGKILLed here: no beat, no result
    after = current_timestamp()
    assert queueing.fetch(job_id).status == "started"
    deadline = execution_deadline(job_id, "bank")
    assert before + 2 <= deadline <= after + 2  # three beats of 0.5 s, at least 2 s

    fresh = _worker()  # judged at chosen moments: no sleeping past the deadline
    assert fresh.requeue_abandoned(now=deadline - 1) == 0  # its deadline has not passed yet
    assert fresh.requeue_abandoned(now=deadline) == 1
    info = queueing.fetch(job_id)
    assert (info.status, info.meta) == ("queued", {"abandoned": 1})
    assert fresh.requeue_abandoned() == 0
    fresh.work(burst=True)
    info = queueing.fetch(job_id)
    assert (info.status, info.result, info.meta) == ("finished", 3, {"abandoned": 1})
    assert Job.fetch(job_id, connection=queueing.backend().redis, serializer=queueing.SERIALIZER).retries_left == 1


def test_heartbeat_keeps_a_long_job_from_looking_abandoned(rq_settings):
    """While the job runs (held until the check is done), the heartbeat moves its execution
    deadline forward: judged at the earlier deadline, the job does not look abandoned."""
    STARTED.clear()
    GATE.clear()
    job_id = queueing.enqueue(f"{JOBS}.hold", "long", queue="predict", retries=0)
    other = _worker()
    seen = []

    def check() -> None:  # beside the worker, which runs in this thread (RQ's signal handlers)
        try:
            assert STARTED.wait(30)
            first = execution_deadline(job_id, "predict")
            wait_for(lambda: execution_deadline(job_id, "predict") > first, 30, "a heartbeat to move the deadline")
            seen.append((queueing.fetch(job_id).status, other.requeue_abandoned(now=first)))
        finally:
            GATE.set()  # the job ends only now

    checker = threading.Thread(target=check)
    checker.start()
    _worker().work(burst=True)
    checker.join()
    assert seen == [("started", 0)]
    info = queueing.fetch(job_id)
    assert (info.status, info.result, info.meta) == ("finished", "long", {})


def test_rq_down_is_reported_fast_and_refuses_jobs():
    settings = replace(Settings.from_env(), redis_url="redis://127.0.0.1:1/0")  # nothing listens there
    runtime.reset()
    runtime.configure(settings=settings)
    try:
        t0 = time.perf_counter()
        health = queueing.health(max_age=0)
        seconds = time.perf_counter() - t0
        print(f"health probe with Redis refusing connections: {seconds * 1000:.1f} ms")
        assert seconds < 1.0  # LS's /health timeout; a few ms here, no retries with backoff
        assert health == {"mode": "rq", "ok": False, "error": "ConnectionError"}
        with pytest.raises(queueing.QueueUnavailable, match="Redis unavailable"):
            queueing.enqueue(f"{JOBS}.add", 1)
    finally:
        runtime.reset()


# --------------------------------------------------------------------------------------- spool
def test_spool_keeps_order_and_stops_at_the_first_refusal(tmp_path):
    spool = queueing.Spool(tmp_path / "spool")
    for i in range(4):
        spool.append("backend.jobs.webhook.apply_webhook", [7, "ANNOTATION_CREATED", {"n": i}], "bank")
    assert len(spool) == 4
    seen = []

    def submit(record):
        if record["args"][2]["n"] == 2:
            raise queueing.QueueUnavailable("down again")
        seen.append(record["args"][2]["n"])

    assert spool.replay(submit) == 2
    assert seen == [0, 1] and len(spool) == 2
    assert spool.replay(lambda r: seen.append(r["args"][2]["n"])) == 2
    assert seen == [0, 1, 2, 3] and len(spool) == 0 and not spool.pending()


def test_spool_drops_a_torn_line(tmp_path):
    spool = queueing.Spool(tmp_path)
    spool.append("f", [1], "bank")
    with open(spool.path, "a") as f:
        f.write('{"func": "f", "ar')  # crash mid-append
    got = []
    assert spool.replay(got.append) == 2
    assert [r["args"] for r in got] == [[1]] and len(spool) == 0


def test_spool_replayer_enqueues_when_redis_answers(rq_settings, tmp_path):
    spool = queueing.Spool(tmp_path)
    spool.append(f"{JOBS}.add", [1, 2], "bank", timeout=50, meta={"project": 7, "event": "ANNOTATION_CREATED"})
    spool.append(f"{JOBS}.add", [3, 4], "bank")
    replayer = queueing.SpoolReplayer(spool, rq_settings)
    assert replayer.run_once() == 2
    assert len(spool) == 0 and replayer.replayed == 2
    assert queueing.health(max_age=0)["queued"]["bank"] == 2
    run_burst(rq_settings)
    jobs = queueing.list_jobs(10)
    assert sorted(j.result for j in jobs) == [3, 7]
    assert [j.meta for j in jobs if j.result == 3] == [{"project": 7, "event": "ANNOTATION_CREATED"}]
    assert json.loads(json.dumps([j.to_dict() for j in queueing.list_jobs(10)]))  # JSON-safe


# --------------------------------------------------------------------------------------- JSON, never pickle
def echo(value):
    return value


def a_set() -> set:
    return {1, 2}


class _Planted:
    """Unpickling this creates the marker file: proof that something unpickled Redis data."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_rq_job_hash_holds_json_not_pickle(rq_settings):
    conn = queueing.backend().redis
    job_id = queueing.enqueue(f"{JOBS}.add", 1, b=2, queue="bank", meta={"project": 3})
    data, meta = conn.hmget(f"rq:job:{job_id}", "data", "meta")
    assert json.loads(zlib.decompress(data)) == [f"{JOBS}.add", None, [1], {"b": 2}]  # rq zips the call
    assert json.loads(meta) == {"project": 3}
    _worker().work(burst=True)
    assert queueing.fetch(job_id).result == 3
    [(_, entry)] = conn.xrange(f"rq:results:{job_id}")
    assert json.loads(base64.b64decode(entry[b"return_value"])) == 3


def test_a_pickle_planted_in_redis_is_never_unpickled(rq_settings, tmp_path, caplog):
    """Someone with access to Redis replaces a queued job's data, meta and result by pickles whose
    loading would run code: the web reads the job as unreadable, the worker fails it, both log it,
    nothing is unpickled, and the next job runs."""
    conn = queueing.backend().redis
    marker = tmp_path / "unpickled"
    evil = pickle.dumps(_Planted(str(marker)))
    job_id = queueing.enqueue(f"{JOBS}.add", 1, queue="bank", retries=0)
    done_id = queueing.enqueue(f"{JOBS}.add", 1, queue="bank")
    conn.hset(f"rq:job:{job_id}", mapping={"data": zlib.compress(evil), "meta": evil})
    conn.hset(f"rq:job:{done_id}", "meta", evil)

    for info in (queueing.fetch(job_id), queueing.fetch_many([job_id])[0],
                 next(j for j in queueing.list_jobs(10) if j.id == job_id)):
        assert (info.status, info.error, info.meta) == ("queued", queueing.UNREADABLE, {})
    assert f"job {job_id}: {queueing.UNREADABLE}" in caplog.text

    ok_id = queueing.enqueue(f"{JOBS}.add", 2, b=3, queue="bank")
    _worker().work(burst=True)
    assert not marker.exists()
    failed = queueing.fetch(job_id)
    assert (failed.status, failed.error) == ("failed", queueing.UNREADABLE)
    assert "DeserializationError" in caplog.text
    assert queueing.fetch(ok_id).result == 5
    assert queueing.fetch(done_id).error == queueing.UNREADABLE  # it ran; its meta stays unreadable
    assert not marker.exists()


@pytest.fixture(params=["embedded", "rq"])
def either_mode(request, monkeypatch):
    """(mode, run): the queue in embedded or RQ mode; run() runs what is queued."""
    if request.param == "embedded":
        request.getfixturevalue("embedded")
        yield "embedded", lambda: None
    else:
        request.getfixturevalue("rq_settings")
        yield "rq", lambda: _worker().work(burst=True)


def test_non_json_data_fails_alike_in_both_modes(either_mode):
    mode, run = either_mode
    for bad in ({"when": datetime.now()}, {1, 2}, float("nan")):
        with pytest.raises(TypeError, match="job arguments must be JSON data"):
            queueing.enqueue(f"{MOD}.echo", bad)
    with pytest.raises(TypeError, match="job meta must be JSON data"):
        queueing.enqueue(f"{MOD}.echo", 1, meta={"at": datetime.now()})
    tuple_id = queueing.enqueue(f"{MOD}.echo", (1, "a"))
    set_id = queueing.enqueue(f"{MOD}.a_set", retries=0)
    run()
    assert wait_done(tuple_id).result == [1, "a"]  # the job got (and returned) the JSON copy: a list
    info = wait_done(set_id)
    assert (info.status, info.error) == ("failed", "TypeError: a job's result must be JSON data (ids, URLs, "
                                                   "hashes, lists and dicts of those): Object of type set "
                                                   "is not JSON serializable"), mode


# ----------------------------------------------------------------------------- interactive jobs
def long_batch(tasks: int) -> int:
    """A job of many tasks that serves queued clicks before each, as backend.jobs' long jobs do;
    task 1 holds until the test let it go (STARTED, GATE)."""
    for n in range(1, tasks + 1):
        queueing.serve_interactive()
        record(f"task {n}")
        if n == 1:
            STARTED.set()
            assert GATE.wait(30)
    return tasks


def test_a_click_queued_behind_a_long_job_runs_before_its_next_task(either_mode):
    mode, run = either_mode
    STARTED.clear()
    GATE.clear()
    ORDER.clear()
    batch = queueing.enqueue(f"{MOD}.long_batch", 3, queue="bank", retries=0)
    clicks: list[str] = []

    def click_while_busy() -> None:  # beside the worker (RQ: it runs in this test's thread)
        try:
            assert STARTED.wait(30)
            clicks.append(queueing.enqueue(f"{JOBS}.record", "click", queue="interactive", retries=0))
            clicks.append(queueing.enqueue(f"{JOBS}.boom", "bad click", queue="interactive", retries=0))
        finally:
            GATE.set()

    clicker = threading.Thread(target=click_while_busy)
    clicker.start()
    run()
    clicker.join()
    assert wait_done(batch).result == 3
    assert ORDER == ["task 1", "click", "task 2", "task 3"], mode
    ok, bad = (wait_done(c) for c in clicks)
    assert (ok.status, ok.result) == ("finished", "click")
    assert (bad.status, bad.error) == ("failed", "ValueError: bad click")  # and the batch carried on
    assert queueing.serve_interactive() == 0


def test_workers_take_interactive_jobs_first(rq_settings):
    ORDER.clear()
    for name, queue in (("predict", "predict"), ("bank", "bank"), ("click", "interactive")):
        queueing.enqueue(f"{JOBS}.record", name, queue=queue)
    assert queueing.health(max_age=0)["queued"] == {"interactive": 1, "bank": 1, "predict": 1, "evaluate": 0}
    from backend.queueing.worker import main
    with pytest.MonkeyPatch.context() as mp:  # the worker's default queue list, without loading models
        seen = {}
        mp.setattr(NTTWorker, "work", lambda self, **kw: seen.setdefault("queues", self.queue_names()))
        mp.setattr(runtime, "get_engine", lambda: type("E", (), {"name": "e", "device": "cpu",
                                                                   "prepare": lambda self: 0.0})())
        assert main([]) == 0
    assert seen["queues"] == [rq_settings.queue_name(q) for q in ("interactive", "bank", "predict", "evaluate")]
    _worker().work(burst=True)
    assert ORDER == ["click", "bank", "predict"]
