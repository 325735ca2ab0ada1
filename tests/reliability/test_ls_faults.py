"""Label Studio unreachable or answering 401/404/429/5xx, on image downloads and on prediction posts.

The fake Label Studio (conftest.FakeLabelStudio) injects the faults; its error bodies echo the
Authorization header they received, as a careless proxy might, so the tests also show that the
key never reaches a log line or an error message. Backoff sleeps are recorded, not slept.
"""
from __future__ import annotations

import logging
import re
import time
import types

import pytest
import urllib3.util.retry

from backend import runtime
from backend.jobs.train import train_project
from backend import queueing
from backend.errors import ImageError, LabelStudioAPIError
from backend.ls.images import ImageFetcher
from backend.ls.auth import LSAuth
from backend.ls.ls_client import LabelStudioClient
from tests.reliability.conftest import (CAT, CONFIG_XML, LEGACY_TOKEN, PAT, FakeLabelStudio, assert_no_secrets,
                                        fill_bank, free_port, polygon_region, wait_for)

PID = 1


@pytest.fixture
def sleeps(monkeypatch):
    """Waits between tries of the image fetcher and the LS client (their retry policy is urllib3's
    Retry, backend.ls.session.LSRetry): recorded, not slept."""
    recorded: list[float] = []
    shim = types.SimpleNamespace(time=time.time, monotonic=time.monotonic, sleep=recorded.append)
    monkeypatch.setattr(urllib3.util.retry, "time", shim)
    return recorded


def fetcher(ls_url: str, tmp_path) -> ImageFetcher:
    return ImageFetcher(ls_url, LSAuth(LEGACY_TOKEN, ls_url), tmp_path / "cache", 0, None, set(),
                        max_pixels=40_000_000, max_bytes=64 * 2**20)


# ------------------------------------------------------------------------------------ image fetch
@pytest.mark.parametrize("outcomes, requests, delays, status, hint", [
    ((500, 500, 500), 3, [1.0], 500, "download failed"),          # bounded: 1 try + 2 retries, the first at once
    ((503,), 2, [], None, None),                                  # a blip: the retry succeeds
    ((429, 502), 3, [1.0], None, None),
    (((429, {"Retry-After": "7"}),), 2, [7], None, None),         # as long as LS asks
    (("drop", "drop", "drop"), 3, [1.0], None, "not reachable"),
    ((401,), 1, [], 401, "LABEL_STUDIO_API_KEY"),                 # retrying cannot cure these
    ((404,), 1, [], 404, "LABEL_STUDIO_URL"),
])
def test_image_download_retries_transient_errors_only(fake_ls, tmp_path, sleeps, outcomes, requests, delays,
                                                      status, hint):
    fake_ls.add_task(1)
    fake_ls.fail("GET", r"/img1\.png$", *outcomes)
    url = "/data/upload/1/img1.png"
    if status is None and hint is None:
        assert fetcher(fake_ls.url, tmp_path).fetch(url).width == 80
    else:
        with pytest.raises(ImageError) as err:
            fetcher(fake_ls.url, tmp_path).fetch(url)
        assert err.value.status == status and hint in str(err.value)
        assert f"{fake_ls.url}/data/upload/1/img1.png" in str(err.value)
        assert_no_secrets(str(err.value), LEGACY_TOKEN)
    assert len(fake_ls.hits("GET", r"/img1\.png$")) == requests
    assert sleeps == delays


def test_image_download_when_label_studio_is_unreachable(tmp_path, sleeps):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(ImageError) as err:
        fetcher(url, tmp_path).fetch("/data/upload/1/img1.png")
    assert "connection failed" in str(err.value) and "LABEL_STUDIO_URL not reachable" in str(err.value)
    assert sleeps == [1.0]


# ------------------------------------------------------------------------------------ LS REST API
POSTS = r"^/api/predictions/$"


def client(fake_ls: FakeLabelStudio, **kw) -> LabelStudioClient:
    return LabelStudioClient(fake_ls.url, LSAuth(LEGACY_TOKEN, fake_ls.url), **kw)


def test_prediction_post_is_repeated_only_when_label_studio_refused_it(fake_ls, sleeps):
    fake_ls.add_task(1)
    fake_ls.fail("POST", POSTS, 429, (503, {"Retry-After": "3"}), (429, {"Retry-After": "86400"}))
    created = client(fake_ls).create_prediction(1, [], 0.0, "ntt-x")
    assert created["task"] == 1 and len(fake_ls.ours(1)) == 1
    assert len(fake_ls.hits("POST", POSTS)) == 4
    assert sleeps == [3, 60]  # the first retry at once; then LS's Retry-After, at most 60 s


@pytest.mark.parametrize("outcome", [502, 504, 503, 500])
def test_prediction_post_is_not_repeated_when_label_studio_may_have_stored_it(fake_ls, sleeps, outcome):
    """A proxy's 502/504 (or a 503 that asks for no wait) may come while LS goes on storing the
    prediction: a repeat would give the task two."""
    fake_ls.add_task(1)
    fake_ls.fail("POST", POSTS, outcome)
    with pytest.raises(LabelStudioAPIError) as err:
        client(fake_ls).create_prediction(1, [], 0.0, "ntt-x")
    assert err.value.status == outcome and sleeps == [] and len(fake_ls.hits("POST", POSTS)) == 1


def test_prediction_post_is_not_repeated_after_a_read_timeout(fake_ls, sleeps):
    fake_ls.add_task(1)
    fake_ls.hold(POSTS)  # LS answers later than the client waits (and may store it meanwhile)
    with pytest.raises(LabelStudioAPIError) as err:
        client(fake_ls, timeout=(5, 0.5)).create_prediction(1, [], 0.0, "ntt-x")
    assert "ReadTimeout" in str(err.value) and "not repeated" in str(err.value)
    assert sleeps == [] and len(fake_ls.hits("POST", POSTS)) == 1


def test_idempotent_writes_are_retried_on_502_and_504(fake_ls, sleeps):
    fake_ls.add_task(1)
    c = client(fake_ls)
    pid = c.create_prediction(1, [], 0.0, "ntt-x")["id"]
    fake_ls.fail("PATCH", rf"^/api/predictions/{pid}/$", 502, 504)
    c.update_prediction(pid, score=0.5)
    assert len(fake_ls.hits("PATCH", rf"^/api/predictions/{pid}/$")) == 3 and sleeps == [1.0]
    assert [p["score"] for p in fake_ls.ours(1)] == [0.5]


def test_429_waits_as_long_as_label_studio_asks(fake_ls, sleeps):
    fake_ls.fail("GET", rf"^/api/projects/{PID}/$", (429, {"Retry-After": "7"}), (429, {"Retry-After": "2"}))
    assert client(fake_ls).get_project(PID)["id"] == PID
    assert sleeps == [7, 2] and len(fake_ls.hits("GET", rf"^/api/projects/{PID}/$")) == 3


def test_a_post_refused_with_401_is_sent_once_more_after_a_pat_refresh(sleeps):
    ls = FakeLabelStudio(token=None, pat=PAT)
    try:
        ls.add_task(1)
        c = LabelStudioClient(ls.url, LSAuth(PAT, ls.url))
        ls.fail("POST", POSTS, 401)  # e.g. the access token expired on the way
        assert c.create_prediction(1, [], 0.0, "ntt-x")["task"] == 1
        assert len(ls.hits("POST", POSTS)) == 2 and len(ls.ours(1)) == 1 and len(ls.access_tokens) == 2
    finally:
        ls.close()


def test_api_errors_are_bounded_and_never_echo_the_key(fake_ls, sleeps):
    fake_ls.fail("GET", r"^/api/tasks/", 500, 500, 500, 500, 500)
    with pytest.raises(LabelStudioAPIError) as err:
        list(client(fake_ls).iter_tasks(PID))
    assert err.value.status == 500 and sleeps == [1.0, 2.0]  # 1 try + 3 retries: at once, then exponential
    assert len(fake_ls.hits("GET", r"^/api/tasks/")) == 4

    fake_ls.fail("POST", POSTS, 401)
    with pytest.raises(LabelStudioAPIError) as err:
        client(fake_ls).create_prediction(1, [], 0.0, "ntt-x")
    assert err.value.status == 401 and "check LABEL_STUDIO_API_KEY" in str(err.value)
    assert "Token ***" in str(err.value)  # LS's (echoing) body is kept, the key is masked
    assert_no_secrets(str(err.value), LEGACY_TOKEN)


def test_prediction_post_when_label_studio_is_unreachable(sleeps):
    url = f"http://127.0.0.1:{free_port()}"
    dead = LabelStudioClient(url, LSAuth(LEGACY_TOKEN, url))
    with pytest.raises(LabelStudioAPIError) as err:
        dead.create_prediction(1, [], 0.0, "ntt-x")
    assert err.value.status is None and "not reachable" in str(err.value)
    assert sleeps == [1.0, 2.0]  # the connection was never made: safe to retry a POST


# ------------------------------------------------------------------------------------ jobs
@pytest.fixture
def job_env(tmp_path, engine, fake_ls, monkeypatch):
    """runtime for calling the backend.jobs modules directly (embedded store); follow-up jobs recorded, not run."""
    from dataclasses import replace

    from backend.settings import Settings

    runtime.reset()
    runtime.configure(settings=replace(Settings.from_env(), model_dir=tmp_path / "model", cache_dir=tmp_path / "cache",
                                       label_studio_url=fake_ls.url, label_studio_api_key=LEGACY_TOKEN,
                                       score_threshold=0.0), engine=engine)
    queued: list[str] = []
    monkeypatch.setattr(queueing, "enqueue", lambda func, *a, **k: queued.append(func) or f"job-{len(queued)}")
    yield queued
    runtime.reset()


def test_training_survives_failing_tasks_and_logs_them_clearly(job_env, fake_ls, sleeps, caplog):
    fake_ls.add_task(1, annotations=[{"id": 11, "task": 1, "result": [polygon_region("a", "Cat", CAT)]}])
    for tid in (2, 3, 4, 5):
        fake_ls.add_task(tid)
    fake_ls.fail("GET", r"/img2\.png$", 500, 500, 500)    # image server error, beyond the retries
    fake_ls.fail("POST", r"^/api/predictions/$", 401)      # the first post (task 3) is refused
    del fake_ls.images["img5.png"]                         # 404
    with caplog.at_level(logging.DEBUG):
        out = train_project(PID)
    assert out["rebuild"]["references"] == 1
    assert (out["tasks"], out["posted"], out["failed"]) == (4, 1, 3)
    assert [len(fake_ls.ours(t)) for t in (2, 3, 4, 5)] == [0, 0, 1, 0]  # the healthy task got through
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(re.search(rf"project 1 task 2: pre-annotation failed: cannot load image {fake_ls.url}/data/upload/1/"
                         r"img2\.png: download failed \(HTTP 500\)", m) for m in errors), errors
    assert any("project 1 task 3: posting the prediction to Label Studio failed" in m and "(HTTP 401)" in m
               and "check LABEL_STUDIO_API_KEY" in m for m in errors), errors
    assert any("project 1 task 5: pre-annotation failed" in m and "(HTTP 404)" in m for m in errors), errors
    assert sleeps == [1.0]
    assert_no_secrets(caplog.text, LEGACY_TOKEN)


def test_predict_gives_per_task_errors_for_ls_faults(embedded, fake_ls, caplog):
    client = embedded()
    fill_bank(PID)
    for tid in (1, 2, 3):
        fake_ls.add_task(tid)
    fake_ls.fail("GET", r"/img1\.png$", 401, 401)  # the job is retried once: both refused
    del fake_ls.images["img2.png"]
    body = {"project": f"{PID}.1717", "label_config": CONFIG_XML,
            "tasks": [{"id": t, "data": {"image": f"/data/upload/{PID}/img{t}.png"}} for t in (1, 2, 3)]}
    with caplog.at_level(logging.INFO):
        items = client.post("/predict", json=body).json["results"]
    assert "HTTP 401" in items[0]["error"] and "check LABEL_STUDIO_API_KEY" in items[0]["error"]
    assert "HTTP 404" in items[1]["error"] and "result" not in items[0] and "result" not in items[1]
    assert isinstance(items[2]["result"], list) and items[2]["model_version"].startswith("ntt-")
    assert any("failed" in r.getMessage() and "img1.png" in r.getMessage() for r in caplog.records)
    assert_no_secrets(caplog.text + str(items), LEGACY_TOKEN)


def test_predict_when_label_studio_is_down(embedded, sleeps):
    client = embedded(label_studio_url=f"http://127.0.0.1:{free_port()}")
    fill_bank(PID)
    body = {"project": f"{PID}.1717", "label_config": CONFIG_XML,
            "tasks": [{"id": t, "data": {"image": f"/data/upload/{PID}/img{t}.png"}} for t in (1, 2)]}
    t0 = time.monotonic()
    items = client.post("/predict", json=body).json["results"]
    assert time.monotonic() - t0 < 20
    assert all("connection failed" in i["error"] and "result" not in i for i in items), items
    wait_for(lambda: not queueing.health()["queued"]["predict"], 5, "the queue to drain")


# ------------------------------------------------------------------------------------ the cache disk
def test_a_full_cache_disk_costs_speed_not_predictions(embedded, fake_ls, monkeypatch, caplog):
    """ENOSPC on the image and proposal caches: predictions are still made and answered."""
    from backend.storage import disk_lru

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(disk_lru, "atomic_write", no_space)  # the writes of both caches
    client = embedded()
    fill_bank(PID)
    fake_ls.add_task(1)
    body = {"project": f"{PID}.1717", "label_config": CONFIG_XML, "tasks": [fake_ls.tasks[1]]}
    with caplog.at_level(logging.WARNING):
        item = client.post("/predict", json=body).json["results"][0]
    assert isinstance(item["result"], list), item
    messages = [r.getMessage() for r in caplog.records]
    assert any("cannot write image cache" in m and "No space left on device" in m for m in messages), messages
    assert any("proposal cache" in m and "No space left on device" in m for m in messages), messages


def test_a_full_disk_for_upsampled_masks_still_predicts(embedded, fake_ls, monkeypatch, caplog):
    """ENOSPC only when storing the upsampled masks beside a cached entry: the prediction is made,
    the proposals stay cached, and the failure is logged (the next match upsamples them again)."""
    from backend.storage import disk_lru

    real = disk_lru.atomic_write

    def no_space_for_masks(path, data, **kwargs):
        if str(path).endswith(".ntm"):
            raise OSError(28, "No space left on device")
        return real(path, data, **kwargs)

    monkeypatch.setattr(disk_lru, "atomic_write", no_space_for_masks)
    client = embedded()
    fill_bank(PID)
    fake_ls.add_task(1)
    body = {"project": f"{PID}.1717", "label_config": CONFIG_XML, "tasks": [fake_ls.tasks[1]]}
    client.post("/predict", json=body)                       # proposals computed and cached
    cached = runtime.get_proposal_cache().get(runtime.get_registry().get(PID, 1).proposal_key)
    assert len(cached) > 0
    # a reference equal to a proposal's descriptor: that proposal scores 1 and its mask is upsampled
    runtime.get_bank_store().update(PID, lambda bank: bank.add("Cat", "0:seed", cached.descriptors[0].numpy()))
    with caplog.at_level(logging.WARNING):
        item = client.post("/predict", json=body).json["results"][0]
    assert isinstance(item["result"], list), item
    messages = [r.getMessage() for r in caplog.records]
    assert any("cannot store upsampled masks" in m and "No space left on device" in m for m in messages), messages
    assert not any("predicting without caching" in m for m in messages), messages
