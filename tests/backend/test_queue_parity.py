"""One job path for both modes: each scenario runs against the embedded backend (worker thread,
SQLite) and RQ on the real Redis (an NTTWorker in burst mode), and must give the same JobInfo.
The embedded backend's clock is a fake one; RQ's scheduled retries are released by hand, as RQ's
scheduler does when their time comes: no test sleeps through a backoff."""
from __future__ import annotations

import os
import threading
import time
import uuid
from dataclasses import replace

import pytest
from rq.job import Job
from rq.utils import current_timestamp

from backend import queueing, runtime
from backend.queueing.worker import NTTWorker
from backend.settings import Settings
from tests.backend.fixtures import purge_queues
from tests.backend.queue_jobs import CALLS, GATE, ORDER, PATH as MOD, STARTED, FakeClock
from tests.helpers import wait_for


class Embedded:
    """The embedded backend, its worker thread running jobs as they come."""

    mode = "embedded"

    def __init__(self, backend: queueing.EmbeddedBackend, clock: FakeClock) -> None:
        self.backend, self.clock = backend, clock

    def run(self) -> None:
        """Nothing to do: the thread runs them."""

    def settle(self, job_id: str) -> queueing.JobInfo:
        """The job once no worker holds it (done, or scheduled for a retry)."""
        return wait_for(lambda: (i := queueing.fetch(job_id)) and i.status not in ("queued", "started") and i,
                        30, f"job {job_id} to settle")

    def due_in(self, job_id: str) -> float:
        return self.backend.db.get(job_id)["run_at"] - self.clock.now

    def advance(self, seconds: float) -> None:
        self.clock.now += seconds
        self.backend.poke()


class RQ:
    """RQ on the real Redis; `run` works the queues empty in this thread, as one worker does."""

    mode = "rq"

    def run(self) -> None:
        backend = queueing.backend()
        NTTWorker(list(backend.queues.values()), connection=backend.redis, heartbeat_s=0.5).work(burst=True)

    def settle(self, job_id: str) -> queueing.JobInfo:
        self.run()
        return queueing.fetch(job_id)

    def due_in(self, job_id: str) -> float:
        for queue in queueing.backend().queues.values():
            if job_id in queue.scheduled_job_registry:
                return queue.scheduled_job_registry.get_scheduled_time(job_id).timestamp() - time.time()
        raise AssertionError(f"job {job_id} is not scheduled")

    def advance(self, seconds: float) -> None:
        """Queue the scheduled jobs due within `seconds`, as RQ's scheduler will then."""
        backend = queueing.backend()
        for queue in backend.queues.values():
            registry = queue.scheduled_job_registry
            for job_id in registry.get_jobs_to_schedule(current_timestamp() + int(seconds)):
                queue.enqueue_job(Job.fetch(job_id, connection=backend.redis, serializer=queueing.SERIALIZER))
                registry.remove(job_id)


@pytest.fixture(params=["embedded", "rq"])
def queue(request, monkeypatch):
    ORDER.clear()
    CALLS.clear()
    GATE.clear()
    STARTED.clear()
    if request.param == "embedded":
        clock = FakeClock()
        backend = queueing.EmbeddedBackend(clock=clock)
        monkeypatch.setattr(queueing, "_backend", backend)
        monkeypatch.setattr(queueing, "_backend_settings", runtime.get_settings())
        yield Embedded(backend, clock)
    else:
        settings = replace(Settings.from_env(), redis_url=os.environ["NTT_TEST_REDIS_URL"],
                           queue_prefix=f"parity-{uuid.uuid4().hex[:8]}")
        runtime.reset()
        runtime.configure(settings=settings)
        yield RQ()
        purge_queues(settings)
        runtime.reset()
    GATE.set()


def beside_the_worker(step) -> threading.Thread:  # noqa: ANN001
    """Run `step` in a thread once the held job started, then let it go (RQ's worker runs in the
    test's thread, the embedded one in its own)."""
    def body() -> None:
        try:
            assert STARTED.wait(30)
            step()
        finally:
            GATE.set()
    thread = threading.Thread(target=body)
    thread.start()
    return thread


def test_success_and_failure_give_the_same_job_info(queue):
    ok = queueing.enqueue(f"{MOD}.progress", 3, queue="bank", meta={"project": 7})
    bad = queueing.enqueue(f"{MOD}.boom", "bad input", queue="predict", retries=0, meta={"task": 1})
    info = queue.settle(ok)
    failed = queue.settle(bad)
    assert (info.status, info.result, info.error, info.meta) == ("finished", 3, None,
                                                                {"project": 7, "done": 3, "total": 3})
    assert (failed.status, failed.result, failed.error, failed.meta) == ("failed", None, "ValueError: bad input",
                                                                        {"task": 1})
    for job in (info, failed):
        assert job.func.startswith(MOD) and job.enqueued_at.tzinfo is not None and job.ended_at is not None
        assert set(job.to_dict(with_result=True)) == {"id", "func", "status", "meta", "error", "enqueued_at",
                                                       "ended_at", "result"}
    assert uuid.UUID(ok) and {j.id for j in queueing.list_jobs(10)} == {ok, bad}


def test_retries_wait_the_same_backoff(queue):
    job_id = queueing.enqueue(f"{MOD}.flaky", "k", 2, queue="bank", retries=2, meta={"project": 1})
    first = queue.settle(job_id)
    assert (first.status, first.error, first.meta) == ("scheduled", None, {"project": 1})
    assert queueing.RETRY_BACKOFF_S[0] - 2 < queue.due_in(job_id) <= queueing.RETRY_BACKOFF_S[0]
    queue.advance(queueing.RETRY_BACKOFF_S[0])
    second = queue.settle(job_id)
    assert second.status == "scheduled" and CALLS == {"k": 2}
    assert queueing.RETRY_BACKOFF_S[1] - 2 < queue.due_in(job_id) <= queueing.RETRY_BACKOFF_S[1]
    queue.advance(queueing.RETRY_BACKOFF_S[1])
    done = queue.settle(job_id)
    assert (done.status, done.result, done.meta) == ("finished", "ok after 3", {"project": 1})

    last = queueing.enqueue(f"{MOD}.flaky", "once", 5, queue="predict", retries=1)
    assert queue.settle(last).status == "scheduled"
    queue.advance(queueing.RETRY_BACKOFF_S[0])
    failed = queue.settle(last)
    assert (failed.status, failed.error) == ("failed", "RuntimeError: attempt 2 failed")


def test_a_job_past_its_timeout_fails_alike(queue):
    info = queue.settle(queueing.enqueue(f"{MOD}.sleepy", 30, queue="predict", retries=0, timeout=1))
    assert (info.status, info.error) == ("failed", "JobTimeoutException: Task exceeded maximum timeout value "
                                                   "(1 seconds)")


def test_an_id_queued_or_running_is_not_queued_twice(queue):
    fixed = f"fixed-{uuid.uuid4().hex[:8]}"
    assert queueing.enqueue(f"{MOD}.hold", "first", queue="bank", job_id=fixed) == fixed
    queued = queueing.enqueue(f"{MOD}.record", "second", queue="bank", job_id=fixed)  # queued (RQ) or running
    running = []
    thread = beside_the_worker(lambda: running.append(queueing.enqueue(f"{MOD}.record", "third", job_id=fixed)))
    queue.run()
    thread.join()
    assert queue.settle(fixed).result == "first" and queued == fixed and running == [fixed]
    assert ORDER == ["first"]
    again = queueing.enqueue(f"{MOD}.record", "after", queue="bank", job_id=fixed)  # done: it runs again
    assert (again, queue.settle(fixed).result, ORDER) == (fixed, "after", ["first", "after"])


def test_queues_are_served_in_priority_order(queue):
    busy = queueing.enqueue(f"{MOD}.hold", "busy", queue="evaluate")
    ids = []
    thread = beside_the_worker(lambda: ids.extend(
        queueing.enqueue(f"{MOD}.record", name, queue=name) for name in ("evaluate", "predict", "bank",
                                                                            "interactive")))
    queue.run()
    thread.join()
    for job_id in [busy, *ids]:
        assert queue.settle(job_id).status == "finished"
    assert ORDER == ["busy", "interactive", "bank", "predict", "evaluate"]


# ------------------------------------------------------------------------- the embedded queue's file
def test_embedded_jobs_survive_a_restart_and_a_running_one_is_requeued(tmp_path, monkeypatch):
    """A process queues two jobs and dies while running the first; the next process (a new backend
    on the same SQLite file) runs the first again, in front, counted "abandoned" as RQ does, then the second."""
    ORDER.clear()
    settings = replace(Settings.from_env(), model_dir=tmp_path, redis_url=None)
    runtime.reset()
    runtime.configure(settings=settings)
    try:
        with monkeypatch.context() as mp:
            mp.setattr(queueing.EmbeddedBackend, "_start", lambda self: None)  # its worker never gets to run
            first = queueing.enqueue(f"{MOD}.record", "first", queue="predict", meta={"project": 1})
            second = queueing.enqueue(f"{MOD}.record", "second", queue="predict")
            assert queueing.backend().db.claim()["id"] == first  # started ... and the process dies here
        path = tmp_path / "state" / "queue.sqlite3"
        assert queueing.backend().db._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal" and path.exists()

        runtime.reset()
        runtime.configure(settings=replace(settings))  # a new process: a new backend on the same file
        assert queueing.backend().fetch(first).meta == {"project": 1, "abandoned": 1}
        infos = [wait_for(lambda j=j: (i := queueing.fetch(j)) and i.done and i, 30, j) for j in (first, second)]
        assert [(i.status, i.result) for i in infos] == [("finished", "first"), ("finished", "second")]
        assert ORDER == ["first", "second"]
    finally:
        runtime.reset()


def test_a_closed_embedded_backend_leaves_its_jobs_to_the_next_one(tmp_path):
    """Settings replaced in one process (runtime.configure): the old backend's thread must not go on
    running jobs (or their retries) beside the new one; its file's jobs wait for the next backend."""
    ORDER.clear()
    old = queueing.EmbeddedBackend(tmp_path / "queue.sqlite3")
    old.close()
    job_id = old.enqueue(f"{MOD}.record", ("later",), {}, "predict", None, None, 0, None)
    assert old.fetch(job_id).status == "queued" and old.health()["worker_started"] is False
    new = queueing.EmbeddedBackend(tmp_path / "queue.sqlite3")
    info = wait_for(lambda: (i := new.fetch(job_id)) and i.done and i, 30, "the job to run")
    assert (info.status, info.result, ORDER) == ("finished", "later", ["later"])
