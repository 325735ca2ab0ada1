"""backend.web.app over Flask's test client, with the exact payloads Label Studio 1.23 sends.

The job functions are replaced by fake `backend.jobs.<module>` modules (the web layer only queues them by
import path), so these tests need no model; the embedded worker thread runs the fakes.
"""
from __future__ import annotations

import base64
import copy
import io
import json
import os
import uuid
import logging
import sys
import threading
import time
import types
from dataclasses import replace

import numpy as np
import pytest

from backend.web import predict_wait
from backend import runtime
from backend import queueing
from backend.web.app import create_app
from backend.errors import ImageError
from backend.settings import Settings
from backend.storage import label_configs
from backend.storage.tasks_registry import result_hash
from tests.backend.fixtures import (ANNOTATION, CONFIG_XML, LEGACY_TOKEN, PREDICT_BODY, PROJECT_UID, RECT_REGION,
                                    SETUP_BODY, WEBHOOK_ANNOTATION_CREATED, WEBHOOK_ANNOTATION_UPDATED,
                                    WEBHOOK_ANNOTATIONS_DELETED, WEBHOOK_PROJECT_UPDATED,
                                    WEBHOOK_START_TRAINING, WEBHOOK_TASKS_DELETED)
from tests.helpers import wait_for

PID = 1  # PROJECT_UID = "1.1795705944"
CHOICES_ONLY_XML = ('<View><Image name="image" value="$image"/>'
                    '<Choices name="q" toName="image"><Choice value="ok"/></Choices></View>')


# ------------------------------------------------------------------------------- fake job functions
class FakeJobs:
    """Stands in for the backend.jobs modules: records calls, can block, fail or deliver late like the jobs."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.holds: dict[int, threading.Event] = {}    # task id -> wait for this before answering
        self.claim_first: set[int] = set()             # claim "web" delivery before the slow part
        self.posted: list[int] = []                    # tasks "posted through the LS API"
        self.modules = {}  # backend.jobs.<module> -> a module of fakes, as queueing imports them
        for module, name in (("predict", "predict_task"), ("webhook", "apply_webhook"), ("train", "train_project")):
            self.modules[f"backend.jobs.{module}"] = types.ModuleType(f"backend.jobs.{module}")
            setattr(self.modules[f"backend.jobs.{module}"], name, getattr(self, name))
        self.modules["backend.jobs.interactive"] = types.ModuleType("backend.jobs.interactive")
        self.modules["backend.jobs.interactive"].warm_task = self.warm_task

    def predict_task(self, pid, task_id, image_url, config_hash, delivery_key=None, warm=False):
        self.calls.append(("predict_task", pid, task_id))
        assert label_configs.get(runtime.get_store(), config_hash)  # the web stored the config it names
        if task_id == 13:
            raise ImageError(image_url, "not found", status=404)
        claimed = None
        if task_id in self.claim_first:
            claimed = runtime.get_store().claim(delivery_key, "web")
        if task_id in self.holds:
            assert self.holds[task_id].wait(10)
        item = {"result": [{**RECT_REGION, "id": f"r{task_id}"}], "score": 0.9,
                "model_version": runtime.model_version(pid)}
        if (claimed or runtime.get_store().claim(delivery_key, "web")) == "api":
            self.posted.append(task_id)
            return {"delivered": "api"}
        return item

    def warm_task(self, pid, task_id, image_url):
        self.calls.append(("warm_task", pid, task_id))
        return {"computed": True}

    def apply_webhook(self, pid, event, payload):
        self.calls.append(("apply_webhook", pid, event, payload))
        if "hold" in self.holds:
            assert self.holds["hold"].wait(10)
        return {"event": event}

    def train_project(self, pid):
        self.calls.append(("train_project", pid))
        for done in (1, 2, 3):
            queueing.update_meta(done=done, total=3)
        return {"tasks": 3}

    def release(self) -> None:
        for event in self.holds.values():
            event.set()


@pytest.fixture
def jobs(monkeypatch):
    fake = FakeJobs()
    for name, module in fake.modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    yield fake
    fake.release()


@pytest.fixture
def make_app(tmp_path, jobs):
    """make_app(**settings overrides) -> Flask app (MODEL_DIR in tmp_path); torn down after the test."""
    apps = []

    def make(**overrides):
        runtime.reset()
        settings = replace(Settings.from_env(), model_dir=tmp_path, cache_dir=tmp_path / "cache", **overrides)
        apps.append(create_app(settings))
        return apps[-1]

    yield make
    jobs.release()
    # let the embedded worker finish what the test queued while the fake jobs are still installed
    end = time.monotonic() + 10
    while (queueing.backend().mode == "embedded" and any(not j.done for j in queueing.list_jobs(1000))
           and time.monotonic() < end):
        time.sleep(0.01)
    for app in apps:
        if app.extensions["ntt"].replayer is not None:
            app.extensions["ntt"].replayer.stop()
    runtime.reset()


@pytest.fixture
def client(make_app):
    return make_app().test_client()


def fill_bank(pid: int = PID) -> None:
    runtime.get_bank_store().update(pid, lambda bank: bank.add("Cat", "ref-1", np.ones(8, np.float32)))


def wait_job(job_id: str, timeout: float = 10.0) -> queueing.JobInfo:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        info = queueing.fetch(job_id)
        if info and info.done:
            return info
        time.sleep(0.01)
    raise AssertionError(f"job {job_id} not done: {queueing.fetch(job_id)}")


def budget_clock(monkeypatch, ready) -> None:
    """backend.web.predict_wait's clock stands still until ready() is true: /predict's budget counts only from
    then on, however slowly a busy machine runs the jobs before that point."""
    frozen = time.monotonic()
    shim = types.SimpleNamespace(perf_counter=time.perf_counter, sleep=time.sleep,
                                 monotonic=lambda: time.monotonic() if ready() else frozen)
    monkeypatch.setattr(predict_wait, "time", shim)


def task_done(task_id: int) -> bool:
    return any(j.done and j.meta.get("task") == task_id for j in queueing.list_jobs(100))


# --------------------------------------------------------------------------------------- health
def test_health_and_root(client):
    for path in ("/", "/health"):
        resp = client.get(path)
        assert resp.status_code == 200
        body = resp.get_json()
        assert body["status"] == "UP" and body["model_class"] == "NTTBackend"
        assert body["ready"] is True and body["redis"] == "disabled"
        assert body["queue"]["mode"] == "embedded" and body["model"] == "sam2.1-t+dinov2-s"
        assert "model_version" not in body


def test_health_reports_degraded_redis_and_still_answers_fast(make_app, jobs):
    c = make_app(redis_url="redis://127.0.0.1:1/0").test_client()  # nothing listens on port 1
    t0 = time.perf_counter()
    body = c.get("/health").get_json()
    seconds = time.perf_counter() - t0
    print(f"/health with Redis refusing connections: {seconds * 1000:.1f} ms")
    assert seconds < 1.0  # LS's /health timeout; a few ms here, no retries with backoff
    assert (body["status"], body["redis"], body["ready"], body["queue"]["ok"]) == ("UP", "degraded", False, False)


# --------------------------------------------------------------------------------------- setup
def test_setup_stores_config_and_connection_and_returns_version(client):
    resp = client.post("/setup", json=SETUP_BODY)
    assert resp.status_code == 200
    mv = resp.get_json()["model_version"]
    assert mv == runtime.model_version(PID) and mv.startswith("ntt-sam2.1-t+dinov2-s-")
    banks = runtime.get_bank_store()
    assert banks.label_config(PID) == CONFIG_XML
    assert banks.ls_connection(PID) == ("http://localhost:8080", LEGACY_TOKEN)
    fill_bank()
    assert client.post("/setup", json=SETUP_BODY).get_json()["model_version"] != mv


@pytest.mark.parametrize("body, message", [
    ({**SETUP_BODY, "project": None}, "missing or invalid 'project'"),
    ({k: v for k, v in SETUP_BODY.items() if k != "project"}, "missing or invalid 'project'"),
    ({**SETUP_BODY, "project": "abc.12"}, "invalid 'project' 'abc.12'"),
    ({k: v for k, v in SETUP_BODY.items() if k != "schema"}, "missing 'schema'"),
    ({**SETUP_BODY, "schema": CHOICES_ONLY_XML}, "no RectangleLabels, PolygonLabels or BrushLabels"),
    ({**SETUP_BODY, "schema": "<View><Image"}, "label config cannot be parsed"),
    ([SETUP_BODY], "request body must be a JSON object"),
])
def test_setup_rejects_bad_input_with_a_message(client, body, message):
    resp = client.post("/setup", json=body)
    assert resp.status_code == 400
    assert message in resp.get_json()["error"]


# --------------------------------------------------------------------------------------- predict
def test_predict_with_empty_bank_returns_empty_results_without_jobs(client, jobs):
    resp = client.post("/predict", json=PREDICT_BODY)
    assert resp.status_code == 200
    mv = runtime.model_version(PID)
    assert resp.get_json() == {"results": [{"result": [], "score": 0.0, "model_version": mv}] * 2}
    assert jobs.calls == [] and queueing.list_jobs() == []
    # registered like predicted tasks, so the first reference's refresh brings them up to date
    records = runtime.get_registry().all(PID)
    assert sorted(records) == [1, 2]
    for task in PREDICT_BODY["tasks"]:
        record = records[task["id"]]
        assert (record.image_url, record.model_version, record.prediction_id) == (task["data"]["image"], mv, None)
        assert record.result_hash == result_hash([])


def test_predict_one_item_per_task_in_order(client, jobs):
    fill_bank()
    body = copy.deepcopy(PREDICT_BODY)
    body["tasks"] = [dict(body["tasks"][i % 2], id=tid) for i, tid in enumerate([5, 3, 8, 1])]
    resp = client.post("/predict", json=body)
    assert resp.status_code == 200
    results = resp.get_json()["results"]
    mv = runtime.model_version(PID)
    assert [r["result"][0]["id"] for r in results] == ["r5", "r3", "r8", "r1"]
    assert all(r["model_version"] == mv and r["score"] == 0.9 for r in results)
    assert sorted(c[2] for c in jobs.calls) == [1, 3, 5, 8]


def test_predict_queues_ids_url_and_config_hash_only(client, jobs, monkeypatch):
    """A predict job carries the task id, its image URL and the label config's hash (the XML is
    stored once under it): none of the task's annotations or predictions, nor the XML, whatever
    their size."""
    fill_bank()
    queued, enqueue = [], queueing.enqueue

    def recording(func, *args, **kwargs):
        queued.append((func, args, kwargs))
        return enqueue(func, *args, **kwargs)

    monkeypatch.setattr(queueing, "enqueue", recording)
    labels = "".join(f'<Label value="class-{n:04d}"/>' for n in range(500))
    xml = CONFIG_XML.replace('<Label value="Dog"/>', '<Label value="Dog"/>' + labels)
    body = copy.deepcopy(PREDICT_BODY)
    body["label_config"] = xml
    body["tasks"] = [dict(body["tasks"][i % 2], id=tid) for i, tid in enumerate(range(21, 41))]
    for task in body["tasks"]:
        task["annotations"] = [ANNOTATION] * 10
        task["predictions"] = [{"id": 7, "model_version": "other", "score": 0.5, "result": [RECT_REGION] * 50}]
    assert len(json.dumps(body)) > 20 * 20_000  # tens of kilobytes per task
    results = client.post("/predict", json=body).get_json()["results"]
    assert [r["result"][0]["id"] for r in results] == [f"r{tid}" for tid in range(21, 41)]
    digest = label_configs.config_hash(xml)
    assert label_configs.get(runtime.get_store(), digest) == xml
    assert len(queued) == 20
    for (func, args, kwargs), task in zip(queued, body["tasks"]):
        assert func == "backend.jobs.predict.predict_task"
        assert list(args) == [PID, task["id"], task["data"]["image"], digest]
        job = {k: v for k, v in kwargs.items() if k not in ("queue", "retries", "meta")}
        assert set(job) == {"delivery_key"}
        assert len(json.dumps([args, job, kwargs["meta"]])) < 300


def test_predict_stops_enqueueing_at_the_first_queue_failure(client, jobs, monkeypatch):
    """A dead queue costs one enqueue attempt, not one per task: every remaining task gets the
    error item at once (LS asks again later), well inside LS's /predict timeout."""
    fill_bank()
    attempts = []

    def down(*args, **kwargs):
        attempts.append(args[0])
        raise queueing.QueueUnavailable("ConnectionError")

    monkeypatch.setattr(queueing, "enqueue", down)
    body = copy.deepcopy(PREDICT_BODY)
    body["tasks"] = [dict(body["tasks"][1], id=tid) for tid in range(1, 7)]
    results = client.post("/predict", json=body).get_json()["results"]
    assert len(attempts) == 1 and len(results) == 6
    assert all("result" not in r and r["error"].startswith("queue unavailable") for r in results)


def test_predict_per_task_errors_keep_the_batch(client, jobs):
    fill_bank()
    good = PREDICT_BODY["tasks"][1]
    tasks = [good, {"data": {"image": "/x.png"}}, {"id": 5}, {"id": 6, "data": {"img": "/x.png"}},
             dict(good, id=13), "not a task", dict(good, id="x7"), dict(good, id=True)]
    resp = client.post("/predict", json={**PREDICT_BODY, "tasks": tasks})
    assert resp.status_code == 200
    results = resp.get_json()["results"]
    assert len(results) == len(tasks)
    assert results[0]["result"][0]["id"] == "r2"
    errors = [r.get("error") for r in results[1:]]
    assert all("result" not in r for r in results[1:])  # LS skips these: the task is retried later
    assert errors[:3] == ["task has no 'id'", "task 5 has no 'data' object",
                          "task 6 has no image URL in data['image']"]
    assert errors[3].startswith("ImageError: cannot load image /data/upload/1/3ab875df-img3.png")
    assert "HTTP 404" in errors[3]
    assert errors[4:] == ["task is not a JSON object", "task id 'x7' is not an integer",
                          "task id 'True' is not an integer"]


def test_predict_uses_the_stored_config_when_the_body_has_none(client, jobs):
    fill_bank()
    body = {k: v for k, v in PREDICT_BODY.items() if k != "label_config"}
    resp = client.post("/predict", json=body)
    assert resp.status_code == 400 and "never set up" in resp.get_json()["error"]
    client.post("/setup", json=SETUP_BODY)
    resp = client.post("/predict", json=body)
    assert resp.status_code == 200 and len(resp.get_json()["results"]) == 2


@pytest.mark.parametrize("body, message", [
    ({"project": PROJECT_UID}, "missing 'tasks'"),
    ({**PREDICT_BODY, "tasks": {"id": 1}}, "missing 'tasks'"),
    ({**PREDICT_BODY, "label_config": CHOICES_ONLY_XML}, "no RectangleLabels"),
    ({**PREDICT_BODY, "project": [1]}, "invalid 'project'"),
    ("tasks", "request body must be a JSON object"),
])
def test_predict_rejects_bad_bodies(client, body, message):
    resp = client.post("/predict", json=body)
    assert resp.status_code == 400 and message in resp.get_json()["error"]


def test_predict_late_results_are_handed_to_the_workers(make_app, jobs, monkeypatch):
    c = make_app(predict_budget_s=0.3).test_client()
    fill_bank()
    jobs.holds[2] = threading.Event()  # held until after the response: task 2 outlives the budget
    t0 = time.perf_counter()
    budget_clock(monkeypatch, lambda: task_done(1))  # task 1 is in by the deadline
    resp = c.post("/predict", json=PREDICT_BODY)
    assert resp.status_code == 200 and time.perf_counter() - t0 >= 0.3  # the budget was waited for
    first, late = resp.get_json()["results"]
    assert first["result"][0]["id"] == "r1"
    assert "result" not in late and late["status"] == "deferred"
    assert jobs.posted == []
    jobs.holds[2].set()
    assert wait_job(late["job"]).result == {"delivered": "api"}
    assert jobs.posted == [2]  # the job delivered through the LS API, not to the closed request


def test_predict_over_the_waiting_bound_hands_over_at_once(make_app, jobs):
    """With every waiting slot taken (WEB_THREADS=2 leaves none) a call does not wait out its budget:
    its running jobs are handed to the workers at once, as if the budget had run out."""
    app = make_app(predict_budget_s=60, web_threads=2)
    c = app.test_client()
    fill_bank()
    jobs.holds[2] = threading.Event()
    t0 = time.perf_counter()
    resp = c.post("/predict", json={**PREDICT_BODY, "tasks": PREDICT_BODY["tasks"][1:]})
    assert time.perf_counter() - t0 < 30  # far from the 60 s budget
    (late,) = resp.get_json()["results"]
    assert "result" not in late and late["status"] == "deferred"
    assert c.get("/metrics").get_json()["predict_calls_not_waited"] == 1
    jobs.holds[2].set()
    assert wait_job(late["job"]).result == {"delivered": "api"} and jobs.posted == [2]


def test_predict_waits_for_a_job_that_already_claimed_the_web_delivery(make_app, jobs, monkeypatch):
    c = make_app(predict_budget_s=0.2).test_client()
    fill_bank()
    jobs.claim_first.add(2)
    jobs.holds[2] = threading.Event()
    store, claims = runtime.get_store(), []
    real_claim = store.claim

    def claim(key, who, *args, **kwargs):
        winner = real_claim(key, who, *args, **kwargs)
        claims.append((who, winner))
        if (who, winner) == ("api", "web"):  # the request lost the hand-over: task 2 finishes in the grace
            jobs.holds[2].set()
        return winner

    monkeypatch.setattr(store, "claim", claim)
    # the budget runs out once task 2 has claimed the web delivery (task 1 claimed it before)
    budget_clock(monkeypatch, lambda: claims.count(("web", "web")) == 2)
    results = c.post("/predict", json=PREDICT_BODY).get_json()["results"]
    assert [r["result"][0]["id"] for r in results] == ["r1", "r2"]
    assert ("api", "web") in claims and jobs.posted == []


def test_setup_and_health_stay_fast_while_the_worker_is_busy(make_app, jobs):
    """/setup and /health never wait on the worker: they answer while it is held (a wait on it
    would last until the hold's 10 s timeout and fail it). Their latency is printed; the bounds
    are Label Studio's own timeouts (a few ms is typical, even on a busy 2-core machine)."""
    app = make_app(predict_budget_s=60)
    c = app.test_client()
    fill_bank()
    jobs.holds["hold"] = threading.Event()
    assert c.post("/webhook", json=WEBHOOK_ANNOTATION_CREATED).status_code == 201  # occupies the worker
    busy_predict = threading.Thread(target=lambda: app.test_client().post("/predict", json=PREDICT_BODY))
    busy_predict.start()  # a /predict waiting on the busy worker in another thread
    wait_for(lambda: queueing.health()["queued"] == {"interactive": 0, "bank": 0, "predict": 2, "evaluate": 0}, 10, "the busy /predict's jobs")
    c.post("/setup", json=SETUP_BODY)  # warm the label-config parse cache, as LS's first call does
    c.get("/health")
    timings = {"/setup": [], "/health": []}
    for _ in range(20):
        t0 = time.perf_counter()
        assert c.post("/setup", json=SETUP_BODY).status_code == 200
        timings["/setup"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        assert c.get("/health").status_code == 200
        timings["/health"].append(time.perf_counter() - t0)
    assert busy_predict.is_alive() and not jobs.holds["hold"].is_set()
    assert queueing.health()["queued"] == {"interactive": 0, "bank": 0, "predict": 2, "evaluate": 0}
    for route, seconds in timings.items():
        print(f"{route} while the worker is busy: median {sorted(seconds)[10] * 1000:.1f} ms, "
              f"max {max(seconds) * 1000:.1f} ms")
    assert max(timings["/setup"]) < 3.0 and max(timings["/health"]) < 1.0, timings  # LS's timeouts
    jobs.release()
    busy_predict.join(10)


# --------------------------------------------------------------------------------------- webhook
@pytest.mark.parametrize("payload, call", [
    (WEBHOOK_ANNOTATION_CREATED, ("apply_webhook", PID, "ANNOTATION_CREATED", "ANNOTATION_CREATED")),
    (WEBHOOK_ANNOTATION_UPDATED, ("apply_webhook", PID, "ANNOTATION_UPDATED", "ANNOTATION_UPDATED")),
    (WEBHOOK_ANNOTATIONS_DELETED, ("apply_webhook", PID, "ANNOTATIONS_DELETED", "ANNOTATIONS_DELETED")),
    ({**WEBHOOK_ANNOTATION_CREATED, "action": "ANNOTATIONS_CREATED"},
     ("apply_webhook", PID, "ANNOTATIONS_CREATED", "ANNOTATIONS_CREATED")),
    (WEBHOOK_PROJECT_UPDATED, ("apply_webhook", PID, "PROJECT_UPDATED", "PROJECT_UPDATED")),
    (WEBHOOK_START_TRAINING, ("train_project", PID)),
    (WEBHOOK_TASKS_DELETED, ("apply_webhook", PID, "TASKS_DELETED", "TASKS_DELETED")),
])
def test_webhook_known_events_queue_a_bank_job(client, jobs, payload, call):
    resp = client.post("/webhook", json=payload)
    assert resp.status_code == 201
    body = resp.get_json()
    assert body["status"] == "ok"
    info = wait_job(body["job"])
    assert info.status == "finished" and [c[:3] for c in jobs.calls] == [call[:3]]
    assert info.meta["event"] == payload["action"] and info.meta["project"] == PID
    if call[0] == "apply_webhook":  # only the ids the event names are queued: the job reads the rest from LS
        queued = jobs.calls[0][3]
        assert set(queued) <= {"annotation", "annotations", "tasks"}
        objects = [queued.get("annotation", {"id": 0}), *queued["annotations"], *queued["tasks"]]
        assert all(set(o) == {"id"} for o in objects), queued
        if "annotation" in payload:
            assert queued["annotation"] == {"id": payload["annotation"]["id"]}
        assert [o["id"] for o in queued["annotations"]] == [a["id"] for a in payload.get("annotations", [])]
        assert [o["id"] for o in queued["tasks"]] == [t["id"] for t in payload.get("tasks", [])]


def test_webhook_unknown_and_invalid(client, jobs):
    resp = client.post("/webhook", json={"action": "TASKS_CREATED", "tasks": [{"id": 1}], "project": {"id": 1}})
    assert (resp.status_code, resp.get_json()) == (200, {"status": "Unknown event"})
    resp = client.post("/webhook", json={"project": {"id": 1}})
    assert resp.status_code == 400 and resp.get_json() == {"error": "missing 'action'"}
    resp = client.post("/webhook", json={"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 1}]})
    assert resp.status_code == 400 and "names no project" in resp.get_json()["error"]
    assert jobs.calls == []


def test_predict_and_setup_while_redis_is_down(make_app, jobs):
    c = make_app(redis_url="redis://127.0.0.1:1/0").test_client()
    resp = c.post("/predict", json=PREDICT_BODY)
    assert resp.status_code == 200  # each task fails alone, without "result": LS asks again later
    assert resp.get_json() == {"results": [{"error": "Redis unavailable; try again later"}] * 2}
    assert c.post("/predict", json={**PREDICT_BODY, "label_config": CHOICES_ONLY_XML}).status_code == 400
    resp = c.post("/setup", json=SETUP_BODY)
    assert (resp.status_code, resp.get_json()) == (503, {"error": "Redis unavailable; try again later"})
    resp = c.get("/jobs")
    assert resp.status_code == 503


def test_webhooks_queue_behind_spooled_ones(make_app, jobs):
    prefix = f"apptest-{uuid.uuid4().hex[:8]}"
    app = make_app(redis_url=os.environ["NTT_TEST_REDIS_URL"], queue_prefix=prefix)
    app.extensions["ntt"].replayer.stop()  # replayed by hand below
    spool = app.extensions["ntt"].spool
    spool.append("backend.jobs.webhook.apply_webhook", [PID, "ANNOTATION_UPDATED", {"n": 1}], "bank")  # Redis was down
    c = app.test_client()
    try:
        resp = c.post("/webhook", json=WEBHOOK_ANNOTATIONS_DELETED)  # Redis is up, but the spool is not empty
        assert (resp.status_code, resp.get_json()) == (202, {"status": "spooled"})
        assert spool.replay(queueing.submit_spooled) == 2
        resp = c.post("/webhook", json=WEBHOOK_ANNOTATION_CREATED)  # spool drained: straight to the queue
        assert resp.status_code == 201
        bank_queue = queueing.backend().queues["bank"]
        events = [job.args[1] for job in bank_queue.get_jobs()]
        assert events == ["ANNOTATION_UPDATED", "ANNOTATIONS_DELETED", "ANNOTATION_CREATED"]
    finally:
        for queue in queueing.backend().queues.values():
            queue.delete(delete_jobs=True)


def test_webhook_is_spooled_while_redis_is_down(make_app, jobs):
    app = make_app(redis_url="redis://127.0.0.1:1/0")
    c = app.test_client()
    resp = c.post("/webhook", json=WEBHOOK_ANNOTATION_CREATED)
    assert (resp.status_code, resp.get_json()) == (202, {"status": "spooled"})
    lines = (app.extensions["ntt"].settings.spool_dir / "jobs.jsonl").read_text().splitlines()
    record = json.loads(lines[0])
    assert len(lines) == 1 and record["func"] == "backend.jobs.webhook.apply_webhook"
    assert record["args"] == [PID, "ANNOTATION_CREATED", {"annotations": [], "tasks": [],
                                                       "annotation": {"id": WEBHOOK_ANNOTATION_CREATED["annotation"]["id"]}}]
    metrics = c.get("/metrics").get_json()
    assert metrics["webhooks_spooled"] == 1 and metrics["spooled_pending"] == 1


# --------------------------------------------------------------------------------------- others
def test_versions_from_json_body_or_query(client):
    mv = runtime.model_version(PID)
    assert client.get("/versions", json={"project": PROJECT_UID}).get_json() == {"versions": [mv]}
    assert client.get("/versions?project=1").get_json() == {"versions": [mv]}
    resp = client.get("/versions", json={"project": "x"})
    assert resp.status_code == 400 and "project" in resp.get_json()["error"]


def test_versions_without_a_project_lists_every_known_project(client):
    """LS 1.23.2 asks GET /versions (Settings -> Model -> versions) without naming the project."""
    assert (client.get("/versions").status_code, client.get("/versions").get_json()) == (200, {"versions": []})
    for pid in (1, 4):
        client.post("/setup", json={**SETUP_BODY, "project": f"{pid}.1795705944"})
    fill_bank(4)
    resp = client.get("/versions")
    assert resp.status_code == 200
    assert resp.get_json() == {"versions": sorted([runtime.model_version(1), runtime.model_version(4)])}
    assert runtime.model_version(1) != runtime.model_version(4)


def test_metrics_count_requests_and_jobs(client, jobs):
    fill_bank()
    client.get("/health")
    client.get("/health")
    client.post("/predict", json=PREDICT_BODY)
    client.post("/webhook", json=WEBHOOK_ANNOTATION_CREATED)
    client.post("/webhook", json={"action": "SOMETHING_ELSE"})
    m = client.get("/metrics").get_json()
    assert m["requests GET /health"] == 2 and m["requests POST /predict"] == 1
    assert m["requests POST /webhook"] == 2 and m["jobs_enqueued predict"] == 2
    assert m["jobs_enqueued bank"] == 1 and m["tasks_predicted"] == 2
    assert m["webhooks ANNOTATION_CREATED"] == 1 and m["webhooks unknown"] == 1
    assert m["spooled_pending"] == 0


def test_jobs_route_lists_jobs_with_progress(client, jobs):
    job_id = client.post("/webhook", json=WEBHOOK_START_TRAINING).get_json()["job"]
    wait_job(job_id)
    listed = client.get("/jobs").get_json()["jobs"]
    assert [j["id"] for j in listed] == [job_id]
    assert listed[0]["status"] == "finished" and listed[0]["func"] == "backend.jobs.train.train_project"
    assert listed[0]["meta"] == {"project": PID, "event": "START_TRAINING", "done": 3, "total": 3}
    one = client.get(f"/jobs?id={job_id}").get_json()
    assert one["result"] == {"tasks": 3} and one["meta"]["done"] == 3
    resp = client.get("/jobs?id=nope")
    assert resp.status_code == 404 and "nope" in resp.get_json()["error"]
    assert client.get("/jobs?limit=abc").status_code == 400


# --------------------------------------------------------------------------------------- HTTP hygiene
def _basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_request_too_large_is_413_json(make_app, jobs):
    c = make_app(max_request_mb=0.001).test_client()  # 1048 bytes
    big = {**PREDICT_BODY, "pad": "x" * 2000}
    for path in ("/predict", "/setup", "/webhook"):
        resp = c.post(path, json=big)
        assert resp.status_code == 413
        assert resp.get_json() == {"error": "request body larger than MAX_REQUEST_MB=0.001"}
    assert c.post("/setup", json={"project": "1.2", "schema": CONFIG_XML}).status_code == 200
    # a chunked body (no Content-Length) is cut at the limit by werkzeug: still a 413, not a 400
    chunked = {"headers": {"Transfer-Encoding": "chunked"}, "environ_overrides": {"wsgi.input_terminated": True}}
    resp = c.post("/setup", input_stream=io.BytesIO(json.dumps(big).encode()), **chunked)
    assert resp.status_code == 413
    small = {"project": "1.2", "schema": CONFIG_XML}
    assert c.post("/setup", input_stream=io.BytesIO(json.dumps(small).encode()), **chunked).status_code == 200


@pytest.mark.parametrize("path", ["/setup", "/predict", "/webhook"])
@pytest.mark.parametrize("data", ["{bad json", "", "[1, 2", "null", "42", '"text"', "[" * 5000])
def test_malformed_or_non_object_json_is_400(client, path, data):
    resp = client.post(path, data=data, content_type="application/json")
    assert resp.status_code == 400
    error = resp.get_json()["error"]
    assert error.startswith("malformed JSON") or error == "request body must be a JSON object"


def test_unknown_route_and_method_are_json(client):
    resp = client.get("/train")
    assert resp.status_code == 404 and "error" in resp.get_json()
    resp = client.get("/predict")
    assert resp.status_code == 405 and "error" in resp.get_json()
    assert set(resp.headers["Allow"].split(", ")) == {"POST", "OPTIONS"}
    assert client.open("/health", method="FOO").status_code == 405
    assert "requests FOO /health" not in client.get("/metrics").get_json()


def test_unexpected_error_is_500_json_without_details(client, monkeypatch, caplog):
    def broken(pid, bank_version=None):
        raise RuntimeError("internal detail xyz")
    monkeypatch.setattr(runtime, "model_version", broken)
    with caplog.at_level(logging.ERROR, logger="backend.web.errors"):
        resp = client.post("/setup", json=SETUP_BODY)
    assert resp.status_code == 500
    assert resp.get_json() == {"error": "internal error; see the backend log"}
    assert "internal detail xyz" in caplog.text  # logged server-side only


def test_request_log_has_no_bodies_or_credentials(make_app, jobs, caplog):
    c = make_app(basic_auth_user="ls", basic_auth_pass="pa55word").test_client()
    with caplog.at_level(logging.DEBUG):
        assert c.post("/setup", json=SETUP_BODY, headers=_basic("ls", "pa55word")).status_code == 200
        c.post("/setup", json=SETUP_BODY, headers=_basic("ls", "guess"))
    assert "POST /setup -> 200" in caplog.text and "POST /setup -> 401" in caplog.text
    secret_b64 = base64.b64encode(b"ls:pa55word").decode()
    for secret in (LEGACY_TOKEN, "pa55word", secret_b64, "guess", "<View>"):
        assert secret not in caplog.text
