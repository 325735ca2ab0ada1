"""Redis stopped and started again while the web process (and a worker) keep running.

A private redis-server with an append-only file plays the production Redis. While it is down:
* /health answers 200 at once and says `"redis": "degraded"`, `"ready": false`;
* webhooks are answered 202 and appended (fsynced) to the spool under MODEL_DIR/spool; a web
  process restarted meanwhile finds them there;
* /predict answers 200 with one error item per task (no hang, no 500), /setup a 503 JSON error.
When Redis is back, the spool is replayed in arrival order (order matters: an update followed by a
delete must not resurrect references), the worker reconnects by itself, and everything works
again without restarting anything.

`test_worker_survives_redis_going_away_at_random_moments` kills Redis (SIGKILL) at 20 seeded random
moments of one worker's life, each found by watching the worker's commands (MONITOR), and checks
that the same worker process applies every queued and spooled event afterwards.
"""
from __future__ import annotations

import json
import os
import random
import re
import threading
import time

import redis
from rq import Queue
from rq.job import Job

from backend import runtime
from backend import queueing
from backend.web.app import create_app
from backend.settings import Settings
from tests.reliability.conftest import (CAT, CONFIG_XML, DOG, LEGACY_TOKEN, ROOT, free_port, mark_bank_filled,
                                        polygon_region, wait_for, wait_job)

PID = 1


def annotation_event(ls, action: str, aid: int, tid: int, region: dict) -> dict:
    """The annotation saved in the fake LS (the job reads it back there) and the webhook LS sends."""
    annotation = ls.save_annotation({"id": aid, "task": tid, "project": PID, "result": [region],
                                     "was_cancelled": False})
    return {"action": action, "project": {"id": PID, "label_config": CONFIG_XML}, "annotation": annotation,
            "task": {k: v for k, v in ls.tasks[tid].items() if k not in ("annotations", "predictions")}}


def deleted_event(ls, *aids: int) -> dict:
    """The annotations deleted in the fake LS and the webhook LS sends."""
    for aid in aids:
        ls.delete_annotation(aid)
    return {"action": "ANNOTATIONS_DELETED", "project": {"id": PID, "label_config": CONFIG_XML},
            "annotations": [{"id": a} for a in aids]}


def ref_ids() -> list[str]:
    bank = runtime.get_bank_store().get(PID)
    return sorted(r.ref_id for c in bank.classes for r in bank.refs(c))


def predict_body(*tids: int) -> dict:
    return {"project": f"{PID}.1717", "label_config": CONFIG_XML,
            "tasks": [{"id": t, "data": {"image": f"/data/upload/{PID}/img{t}.png"}} for t in tids]}


def timed(call):
    t = time.perf_counter()
    resp = call()
    return resp, time.perf_counter() - t


def test_redis_restart_with_web_and_worker_running(tmp_path, private_redis, fake_ls, workers):
    server = private_redis()
    env = {**os.environ, "REDIS_URL": server.url, "NTT_QUEUE_PREFIX": "restart", "MODEL_DIR": str(tmp_path / "model"),
           "LABEL_STUDIO_URL": fake_ls.url, "LABEL_STUDIO_API_KEY": LEGACY_TOKEN, "SCORE_THRESHOLD": "0",
           "WORKER_HEARTBEAT_S": "0.5", "PREDICT_BUDGET_S": "30", "LOG_LEVEL": "INFO", "PYTHONPATH": str(ROOT)}
    settings = Settings.from_env(env)
    for tid in (1, 2, 3):
        fake_ls.add_task(tid)
    runtime.reset()
    client = create_app(settings).test_client()
    try:
        assert client.post("/setup", json={"project": f"{PID}.1717", "schema": CONFIG_XML}).status_code == 200
        worker = workers(env, tmp_path / "worker.log")
        job = client.post("/webhook", json=annotation_event(fake_ls, "ANNOTATION_CREATED", 11, 1,
                                                            polygon_region("a", "Cat", CAT))).json["job"]
        assert wait_job(job).status == "finished" and ref_ids() == ["11:a"]
        wait_for(lambda: client.get("/health").json["ready"], 10, "/health ready")

        # ------------------------------------------------------------ Redis goes away
        server.stop()
        down_at, seen = time.monotonic(), []
        while not seen or seen[-1]["redis"] != "degraded":  # /health reads a snapshot (<= 2 s old)
            resp, seconds = timed(lambda: client.get("/health"))
            assert resp.status_code == 200 and seconds < 1.0, seconds  # LS's /health timeout
            seen.append(resp.json)
            assert time.monotonic() - down_at < 15, seen[-1]  # a 2 s snapshot + the probe, with margin
            time.sleep(0.05)
        assert (seen[-1]["status"], seen[-1]["ready"]) == ("UP", False)

        spooled = [annotation_event(fake_ls, "ANNOTATION_CREATED", 12, 2, polygon_region("b", "Dog", DOG)),
                   annotation_event(fake_ls, "ANNOTATION_UPDATED", 11, 1, polygon_region("c", "Dog", DOG)),
                   deleted_event(fake_ls, 12)]
        for payload in spooled:
            resp, seconds = timed(lambda: client.post("/webhook", json=payload))
            assert (resp.status_code, resp.json) == (202, {"status": "spooled"}) and seconds < 5  # fsync
        lines = (settings.spool_dir / "jobs.jsonl").read_text().splitlines()
        assert [json.loads(ln)["args"][1] for ln in lines] == ["ANNOTATION_CREATED", "ANNOTATION_UPDATED",
                                                               "ANNOTATIONS_DELETED"]

        resp, seconds = timed(lambda: client.post("/predict", json=predict_body(2, 3)))
        assert resp.status_code == 200 and seconds < 5, (resp.status_code, seconds)
        items = resp.json["results"]
        assert len(items) == 2 and all("result" not in i and "Redis" in i["error"] for i in items), items
        resp = client.post("/setup", json={"project": f"{PID}.1717", "schema": CONFIG_XML})
        assert resp.status_code == 503 and "Redis unavailable" in resp.json["error"]

        # the web process restarts during the outage: the spool is on disk, nothing is lost
        runtime.reset()
        client = create_app(settings).test_client()
        assert client.get("/metrics").json["spooled_pending"] == 3

        # ------------------------------------------------------------ Redis is back (after >= 8 s)
        time.sleep(max(0.0, down_at + 8 - time.monotonic()))
        server.start()
        wait_for(lambda: client.get("/health").json["redis"] == "ok", 10, "/health to see Redis again")
        wait_for(lambda: client.get("/metrics").json["spooled_pending"] == 0, 10, "the spool replay")
        # replayed in order, then run by the worker that survived the outage
        wait_for(lambda: ref_ids() == ["11:c"], 90, "the spooled webhooks to be applied in order")
        assert worker.proc.poll() is None
        wait_for(lambda: client.get("/health").json["ready"], 30, "the worker to be listed again")
        items = client.post("/predict", json=predict_body(2, 3)).json["results"]
        assert [sorted(i) for i in items] == [["model_version", "result", "score"]] * 2, items
        assert client.post("/setup", json={"project": f"{PID}.1717", "schema": CONFIG_XML}).status_code == 200
    finally:
        runtime.reset()
    log = worker.output()
    assert "Redis" in log  # the outage is visible in the worker log


def test_webhooks_keep_their_order_while_the_spool_drains(make_app, fake_jobs, private_redis):
    """A webhook that arrives after Redis is back but before the spool is drained queues behind the
    spooled ones (else ANNOTATION_UPDATED + ANNOTATIONS_DELETED could be applied in reverse)."""
    server = private_redis()
    app = make_app(redis_url=server.url)
    replayer = app.extensions["ntt"].replayer
    replayer.stop()  # this test replays by hand, at a chosen moment
    client = app.test_client()
    mark_bank_filled(PID)
    server.stop()
    for aid in (1, 2):
        assert client.post("/webhook", json={"action": "ANNOTATION_UPDATED", "project": {"id": PID},
                                             "annotation": {"id": aid}}).status_code == 202
    server.start()
    wait_for(lambda: queueing.health(max_age=0)["ok"], 10, "Redis")
    resp = client.post("/webhook", json={"action": "ANNOTATIONS_DELETED", "project": {"id": PID},
                                         "annotations": [{"id": 1}]})
    assert resp.status_code == 202  # behind the spooled two, not ahead of them
    assert replayer.run_once() == 3
    queue = Queue(app.extensions["ntt"].settings.queue_name("bank"), connection=server.client(),
                  serializer=queueing.SERIALIZER)
    jobs = [Job.fetch(j, connection=server.client(), serializer=queueing.SERIALIZER) for j in queue.get_job_ids()]
    assert [(j.args[1], j.args[2].get("annotation", {}).get("id")) for j in jobs] == [
        ("ANNOTATION_UPDATED", 1), ("ANNOTATION_UPDATED", 2), ("ANNOTATIONS_DELETED", None)]
    # with the spool empty, webhooks go straight to the queue again
    assert client.post("/webhook", json={"action": "ANNOTATION_UPDATED", "project": {"id": PID},
                                         "annotation": {"id": 3}}).status_code == 201


def test_a_webhook_that_can_be_neither_queued_nor_spooled_is_a_clear_503(make_app, fake_jobs, monkeypatch, caplog):
    """Redis down and the spool's disk full: the event cannot be kept, and the answer and the log say so."""
    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(queueing.Spool, "append", disk_full)
    client = make_app(redis_url=f"redis://127.0.0.1:{free_port()}/0").test_client()  # nothing listens there
    resp = client.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": PID},
                                         "annotation": {"id": 1}})
    assert resp.status_code == 503 and "lost" in resp.json["error"], resp.json
    assert any(r.levelname == "ERROR" and "ANNOTATION_CREATED" in r.getMessage() and "lost" in r.getMessage()
               and "No space left on device" in r.getMessage() for r in caplog.records), caplog.text
    assert client.get("/health").status_code == 200 and client.get("/metrics").status_code == 200


# (name, MONITOR line pattern, most n): moments of a worker's life; the kill lands at (or just
# after) the n-th such command, n random. "any" is the n-th command of anyone (worker, scheduler, web).
MOMENTS = [("dequeue", r"^BLPOP ", 1),                      # idle, blocked on its queues
           ("set_state", r"^HSET rq:worker:\S+ state ", 2),
           ("dequeued", r"^HGETALL rq:job:", 1),             # between BLPOP and the job's start
           ("mid-job", r"^HSET rq:job:\S+ meta ", 3),        # the job reports progress
           ("heartbeat", r"^EXPIRE rq:worker:", 2),
           ("finishing", r"^XADD rq:results:", 1),           # writing the result
           ("maintenance", r"^ZRANGEBYSCORE rq:wip:", 1),    # requeue_abandoned, every 5 s
           ("any", r"", 40)]


def kill_on(server, pattern: str, nth: int) -> threading.Event:
    """SIGKILL `server` right after the `nth` command matching `pattern` (MONITOR); returns an
    Event set once it is done. Returns when MONITOR is listening."""
    listening, killed = threading.Event(), threading.Event()

    def watch() -> None:
        seen = 0
        try:
            with redis.Redis.from_url(server.url).monitor() as monitor:
                listening.set()
                for cmd in monitor.listen():
                    seen += bool(re.search(pattern, cmd["command"]))
                    if seen >= nth:
                        break
        except redis.exceptions.ConnectionError:
            return  # the test ended (and stopped the server) first
        finally:
            listening.set()
        server.kill()
        killed.set()

    threading.Thread(target=watch, name="kill-on", daemon=True).start()
    assert listening.wait(10)
    return killed


def test_worker_survives_redis_going_away_at_random_moments(tmp_path, private_redis, workers):
    seed = int(os.environ.get("NTT_OUTAGE_SEED") or random.randrange(1 << 30))
    print(f"NTT_OUTAGE_SEED={seed}")
    rng = random.Random(seed)
    server = private_redis()
    env = {**os.environ, "REDIS_URL": server.url, "NTT_QUEUE_PREFIX": "outage", "MODEL_DIR": str(tmp_path / "model"),
           "WORKER_HEARTBEAT_S": "0.5", "LOG_LEVEL": "INFO", "PYTHONPATH": str(ROOT)}
    settings = Settings.from_env(env)
    runtime.reset()
    runtime.configure(settings=settings)
    spool = queueing.Spool(settings.spool_dir)
    replayer = queueing.SpoolReplayer(spool, settings, interval=0.2)
    applied_path = tmp_path / "applied.txt"
    applied_path.touch()

    def applied() -> set[str]:
        return set(applied_path.read_text().split())

    def submit(event: str) -> bool:
        """Queue the event, else spool it, as the web process does with a webhook; True if queued."""
        args = [str(applied_path), event]
        try:
            queueing.enqueue("tests.reliability.outage_jobs.apply", *args, queue="bank")
            return True
        except queueing.QueueUnavailable:
            spool.append("tests.reliability.outage_jobs.apply", args, "bank")
            return False

    t0 = time.monotonic()
    worker = workers(env, tmp_path / "worker.log")
    replayer.start()
    moments = []
    try:
        for r in range(20):
            name, pattern, most = rng.choice(MOMENTS)
            nth = rng.randint(1, most)
            moments.append(f"{name}#{nth}")
            killed = kill_on(server, pattern, nth)
            submit(f"queued-{r}")  # spooled if the kill came first
            assert killed.wait(30), f"round {r}: no {name} command #{nth} within 30 s ({moments})"
            assert not submit(f"spooled-{r}")  # Redis is away: spooled
            server.start()  # same port, same append-only file
            try:
                wait_for(lambda: {f"queued-{r}", f"spooled-{r}"} <= applied(), 120,
                         f"round {r} ({name}#{nth}) to be applied; seed {seed}")
            except AssertionError as exc:
                raise AssertionError(f"{exc}; applied {sorted(applied())}, spooled {len(spool)}; "
                                     f"worker log:\n{worker.output()[-4000:]}") from None
            assert worker.proc.poll() is None, f"the worker quit at {moments[-1]}:\n{worker.output()[-3000:]}"
        wanted = {f"{kind}-{r}" for r in range(20) for kind in ("queued", "spooled")}
        assert applied() == wanted
        assert len(spool) == 0
        wait_for(lambda: server.client().scard(f"rq:workers:{settings.queue_name('bank')}") == 1, 30,
                 "the worker to be registered")
    finally:
        replayer.stop()
        runtime.reset()
    out = worker.output()
    assert "unhandled exception" not in out and "quitting" not in out, out[-3000:]
    print(f"{len(moments)} outages ({', '.join(moments)}) in {time.monotonic() - t0:.0f} s")
