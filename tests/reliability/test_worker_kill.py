"""SIGKILL a real worker in the middle of a bank update and in the middle of a batch pre-annotation.

Setup: a private redis-server (with a password), the web app in-process, the fake Label Studio, and
`backend.queueing.worker` subprocesses with the small random-weight models. The job is made slow
deterministically without any test hook in the product: the fake LS holds the image download
the job is waiting for, and the test kills the worker's whole process group (worker + scheduler)
while it waits. Random-weight models come from a fixed seed, so every worker process computes the
same descriptors, as workers with real checkpoints do.

What must hold:
* the bank stays at its last good version while the killed job is pending (updates are atomic);
* the abandoned job is noticed within seconds (worker heartbeat, WORKER_HEARTBEAT_S) and put back
  on its queue when a worker runs again, without spending one of its error retries;
* no reference is lost, and every unlabelled task ends with exactly one prediction of ours;
* the worker logs contain neither the LS API key nor the Redis password.
"""
from __future__ import annotations

import os
import time

from backend import runtime
from backend import queueing
from backend.web.app import create_app
from backend.settings import Settings
from tests.reliability.conftest import (CAT, CONFIG_XML, DOG, LEGACY_TOKEN, ROOT, assert_no_secrets,
                                        polygon_region, wait_for, wait_job)

PID = 1
REDIS_PASSWORD = "redis-pw-5f1c9a"


def annotation_webhook(ls, aid: int, tid: int, region: dict) -> dict:
    """The annotation saved in the fake LS (the job reads it back there) and the webhook LS sends."""
    annotation = ls.save_annotation({"id": aid, "task": tid, "project": PID, "result": [region],
                                     "was_cancelled": False})
    return {"action": "ANNOTATION_CREATED", "project": {"id": PID, "label_config": CONFIG_XML},
            "annotation": annotation,
            "task": {k: v for k, v in ls.tasks[tid].items() if k not in ("annotations", "predictions")}}


def ref_ids() -> list[str]:
    bank = runtime.get_bank_store().get(PID)
    return sorted(r.ref_id for c in bank.classes for r in bank.refs(c))


def test_sigkill_mid_bank_update_and_mid_training(tmp_path, private_redis, fake_ls, workers):
    t0 = time.monotonic()
    server = private_redis(password=REDIS_PASSWORD)
    env = {**os.environ, "REDIS_URL": server.url, "NTT_QUEUE_PREFIX": "kill", "MODEL_DIR": str(tmp_path / "model"),
           "LABEL_STUDIO_URL": fake_ls.url, "LABEL_STUDIO_API_KEY": LEGACY_TOKEN, "SCORE_THRESHOLD": "0",
           "WORKER_HEARTBEAT_S": "0.5", "LOG_LEVEL": "INFO", "PYTHONPATH": str(ROOT)}
    runtime.reset()
    app = create_app(Settings.from_env(env))
    client = app.test_client()

    def worker(name: str):
        return workers(env, tmp_path / f"{name}.log")

    try:
        assert client.post("/setup", json={"project": f"{PID}.1717", "schema": CONFIG_XML}).status_code == 200
        for tid in range(1, 7):  # 1, 2 get annotated; 3..6 stay unlabelled
            fake_ls.add_task(tid)
        banks = runtime.get_bank_store()
        w1 = worker("w1")

        # the last good version: one reference from annotation 11
        first = annotation_webhook(fake_ls, 11, 1, polygon_region("a", "Cat", CAT))
        job = client.post("/webhook", json=first).json["job"]
        assert wait_job(job).status == "finished"
        v1 = banks.version(PID)
        assert v1 != "empty" and ref_ids() == ["11:a"]

        # -------- SIGKILL during a bank update (annotation 12: its image download hangs)
        release, arrived = fake_ls.hold(r"/img2\.png$")
        fake_ls.tasks[2]["annotations"] = [{"id": 12, "task": 2, "was_cancelled": False,
                                            "result": [polygon_region("b", "Dog", DOG)]}]
        fake_ls.tasks[1]["annotations"] = [{"id": 11, "task": 1, "was_cancelled": False,
                                            "result": [polygon_region("a", "Cat", CAT)]}]
        second = annotation_webhook(fake_ls, 12, 2, polygon_region("b", "Dog", DOG))
        job2 = client.post("/webhook", json=second).json["job"]
        wait_for(arrived.is_set, 30, "the bank job to request the image")
        assert queueing.fetch(job2).status == "started"
        w1.kill()
        release.set()
        time.sleep(3)  # longer than the heartbeat TTL: the execution has expired by now
        assert banks.version(PID) == v1 and ref_ids() == ["11:a"]      # last good version, intact
        assert runtime.model_version(PID).endswith(v1)
        assert queueing.fetch(job2).status == "started"                 # nobody to notice yet

        w2 = worker("w2")                                               # a worker comes back
        info = wait_job(job2, 60)
        assert info.status == "finished", info.error
        assert info.result["references"] == 1 and info.meta.get("abandoned") == 1
        v2 = banks.version(PID)
        assert v2 not in ("empty", v1) and ref_ids() == ["11:a", "12:b"]   # no reference lost

        # -------- SIGKILL during Start training (pre-annotation of 3..6; task 5's download hangs)
        release, arrived = fake_ls.hold(r"/img5\.png$")
        train = client.post("/webhook", json={"action": "START_TRAINING",
                                              "project": {"id": PID, "label_config": CONFIG_XML}}).json["job"]
        wait_for(arrived.is_set, 60, "training to reach task 5")
        # posts run beside the predictions: let those of 3 and 4 be recorded before the kill
        registry = runtime.get_registry()
        wait_for(lambda: all((r := registry.get(PID, t)) and r.prediction_id for t in (3, 4)), 30,
                 "the posts of tasks 3 and 4 to be recorded")
        assert [len(fake_ls.ours(t)) for t in (3, 4, 5, 6)] == [1, 1, 0, 0]
        w2.kill()
        release.set()
        assert banks.version(PID) == v2                                  # same annotations, same bank
        worker("w3")
        info = wait_job(train, 90)
        assert info.status == "finished", info.error
        assert info.meta.get("abandoned") == 1 and info.result["failed"] == 0
        mv = runtime.model_version(PID)
        assert mv.endswith(v2) and ref_ids() == ["11:a", "12:b"]
        for tid in (3, 4, 5, 6):                                         # every task: one prediction
            ours = fake_ls.ours(tid)
            assert len(ours) == 1 and ours[0]["model_version"] == mv, (tid, ours)
        writes = fake_ls.hits("POST", r"^/api/predictions/$") + fake_ls.hits("PATCH", r"^/api/predictions/")
        assert len(writes) == 4  # tasks 3 and 4 were not posted a second time
    finally:
        runtime.reset()
    logs = workers.logs()
    assert_no_secrets(logs, LEGACY_TOKEN, REDIS_PASSWORD)
    assert "abandoned" in logs  # the requeue is logged
    print(f"worker-kill scenario: {time.monotonic() - t0:.1f} s")
