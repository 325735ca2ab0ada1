"""End to end over the real Redis on 127.0.0.1:6379 with a real `python -m backend.queueing.worker` process.

webhook (ANNOTATION_CREATED with a brush region) -> bank job on the worker -> bank version changes
-> /setup returns the new model_version -> /predict runs on the worker with the new bank.
The "Label Studio" here is bench/fake_ls.py's (the project, the task, its annotation and image,
behind a legacy token).
Small random-weight models (tests/conftest.py): the numbers are meaningless, the plumbing is real.
"""
from __future__ import annotations

import copy
import io
import os
import re
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
from PIL import Image

from backend import runtime
from backend import queueing
from backend.web.app import create_app
from backend.settings import Settings
from bench.fake_http import Request
from bench.fake_ls import FakeLabelStudio
from tests.backend.fixtures import (BRUSH_REGION, CONFIG_XML, LEGACY_TOKEN, PREDICT_BODY, SETUP_BODY,
                                    WEBHOOK_ANNOTATION_CREATED, purge_queues)
from tests.helpers import ROOT, WorkerProcess, wait_for

PID = 1
IMAGE_PATH = "/data/upload/1/cat-64x48.png"


def _png() -> bytes:
    """64x48 image: a bright 'cat' block (rows 12..35, cols 16..47, where the brush is) on noise."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 60, (48, 64, 3), dtype=np.uint8)
    img[12:36, 16:48] = (230, 180, 90)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


class RecordingLS(FakeLabelStudio):
    """bench/fake_ls.py's Label Studio, recording (target, Authorization) of every request."""

    def __init__(self) -> None:
        super().__init__(LEGACY_TOKEN, keep_alive=False)
        self.seen: list[tuple[str, str | None]] = []

    def dispatch(self, req: Request) -> object:
        self.seen.append((req.target, req.headers.get("Authorization")))
        return super().dispatch(req)


@pytest.fixture
def fake_ls():
    """Project 1 whose task 1 shows the image at IMAGE_PATH and holds the annotator's brush region
    (annotation 1), behind the legacy token, like LS."""
    ls = RecordingLS()
    ls.add_project(PID, CONFIG_XML)
    ls.add_task(PID, 1, IMAGE_PATH.rsplit("/", 1)[1], _png(),
                annotations=[{**WEBHOOK_ANNOTATION_CREATED["annotation"], "result": [BRUSH_REGION]}])
    yield ls.url, ls.seen
    ls.close()


@pytest.fixture
def deployment(tmp_path, fake_ls):
    """Env + settings shared by the in-test web app and the worker subprocess; Redis keys cleaned up."""
    ls_url, seen = fake_ls
    env = {**os.environ, "REDIS_URL": os.environ["NTT_TEST_REDIS_URL"],
           "NTT_QUEUE_PREFIX": f"rqw-{uuid.uuid4().hex[:10]}", "MODEL_DIR": str(tmp_path),
           "LABEL_STUDIO_URL": ls_url, "LABEL_STUDIO_API_KEY": LEGACY_TOKEN, "LOG_LEVEL": "INFO",
           "PYTHONPATH": str(ROOT)}
    settings = Settings.from_env(env)
    runtime.reset()
    app = create_app(settings)
    yield env, settings, app.test_client(), seen
    purge_queues(settings)
    runtime.reset()


def test_webhook_to_worker_to_new_model_version(deployment, tmp_path):
    env, settings, client, seen = deployment
    t_start = time.monotonic()

    mv0 = client.post("/setup", json=SETUP_BODY).get_json()["model_version"]
    health = client.get("/health").get_json()
    assert (health["redis"], health["ready"], health["queue"]["mode"]) == ("ok", False, "rq")  # no worker yet

    # the annotator saves a brush region on the task whose image LS serves at IMAGE_PATH
    payload = copy.deepcopy(WEBHOOK_ANNOTATION_CREATED)
    payload["annotation"]["result"] = [BRUSH_REGION]
    payload["task"]["data"]["image"] = IMAGE_PATH
    resp = client.post("/webhook", json=payload)
    assert resp.status_code == 201
    job_id = resp.get_json()["job"]
    assert queueing.fetch(job_id).status == "queued"

    worker = WorkerProcess(env, tmp_path / "worker.log")
    try:
        info = wait_for(lambda: (i := queueing.fetch(job_id)) and i.done and i, 60, "the bank job")
        assert info.status == "finished", info.error
        assert (info.result["event"], info.result["annotation"], info.result["references"]) == (
            "ANNOTATION_CREATED", 1, 1)
        assert info.result["changed"] is True
        assert (IMAGE_PATH, f"Token {LEGACY_TOKEN}") in seen  # the worker fetched the image from "LS"

        mv1 = client.post("/setup", json=SETUP_BODY).get_json()["model_version"]
        # the web process never loads a model: it names the weights the worker published at its start
        assert mv0 == "ntt-sam2.1-t+dinov2-s-empty"
        assert re.fullmatch(rf"ntt-sam2\.1-t\+dinov2-s@[0-9a-f]{{8}}-{info.result['version']}", mv1), mv1
        assert client.get("/versions", json={"project": "1.1795705944"}).get_json() == {"versions": [mv1]}
        # a worker listens now (/health reads a snapshot up to HEALTH_MAX_AGE_S old)
        wait_for(lambda: client.get("/health").get_json()["ready"] is True, 15 * queueing.HEALTH_MAX_AGE_S,
                 "/health to report a ready worker")

        # /predict runs on the worker against the new bank
        body = copy.deepcopy(PREDICT_BODY)
        body["tasks"] = [dict(body["tasks"][1], id=2, data={"image": IMAGE_PATH}),
                         dict(body["tasks"][1], id=3, data={})]
        results = client.post("/predict", json=body).get_json()["results"]
        assert len(results) == 2
        assert results[0]["model_version"] == mv1 and isinstance(results[0]["result"], list)
        assert "result" not in results[1] and "no image URL" in results[1]["error"]
    finally:
        worker.stop()
    out = worker.output()
    assert "engine sam2.1-t+dinov2-s loaded on cpu" in out, out
    assert f"serving queues {[settings.queue_name(q) for q in ('interactive', 'bank', 'predict', 'evaluate')]}" in out
    assert LEGACY_TOKEN not in out
    print(f"webhook -> worker -> new model version -> predict: {time.monotonic() - t_start:.1f} s")


def test_worker_refuses_to_start_without_redis(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    proc = subprocess.run([sys.executable, "-m", "backend.queueing.worker", "--burst"], cwd=ROOT, timeout=60,
                          env={**env, "MODEL_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "REDIS_URL is not set" in proc.stderr


def test_worker_reports_bad_settings_by_name(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "backend.queueing.worker", "--burst"], cwd=ROOT, timeout=60,
                          env={**os.environ, "REDIS_URL": "redis://127.0.0.1:6379/0",
                               "NTT_POINTS_PER_SIDE": "lots", "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "configuration error: Invalid NTT_POINTS_PER_SIDE='lots': expected a number" in proc.stderr
