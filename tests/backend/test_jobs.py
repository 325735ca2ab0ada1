"""Jobs end to end with the real small engine (random weights) and a fake Label Studio.

The fake LS is bench/fake_ls.py's (real HTTP), recording every prediction write. Queueing is
replaced by a recorder (the jobs' enqueue calls are asserted, not run), the store is the real Redis
under a per-test key prefix.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from dataclasses import replace
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from backend import runtime
from backend.delivery import bulk as bulk_delivery
from backend import queueing
from backend.delivery.post import deliver
from backend.jobs import train as train_job
from backend.jobs.bank import rebuild_bank
from backend.jobs.context import JobContext
from backend.jobs.inference import basis, match_item
from backend.jobs.predict import predict_task
from backend.jobs.refresh import refresh_project, rescore_cached
from backend.jobs.train import train_project
from backend.jobs.webhook import apply_webhook
from backend.errors import LabelStudioAPIError
from backend.regions.label_config import parse_label_config
from backend.settings import Settings
from backend.storage import label_configs
from backend.storage.store import RedisStore
from backend.storage.tasks_registry import result_hash
from bench.fake_http import Reply, Request, RouteServer
from bench.fake_ls import FakeLabelStudio
from tests.backend.fixtures import LEGACY_TOKEN as TOKEN
from tests.helpers import png_bytes
import model.checkpoints
from model.bank import MemoryBank
from model.engine import Engine, EngineConfig
from model.options import MethodOptions
from model.types import Proposals

PID = 7
LABEL_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <PolygonLabels name="poly" toName="image"><Label value="Cat"/><Label value="Dog"/></PolygonLabels>
  <RectangleLabels name="box" toName="image"><Label value="Cat"/><Label value="Dog"/></RectangleLabels>
</View>"""


# ------------------------------------------------------------------------------ fake Label Studio
class FakeLS(FakeLabelStudio):
    """bench/fake_ls.py's Label Studio holding project PID, one connection per request; every
    prediction write is recorded in `calls` as (kind, path, body), kind POST, PATCH, IMPORT or
    DELETE-VERSION."""

    def __init__(self) -> None:
        super().__init__(TOKEN, keep_alive=False)
        self.calls: list[tuple[str, str, Any]] = []
        self.add_project(PID, LABEL_CONFIG)

    def add_task(self, tid: int, seed: int, annotations=()) -> dict:
        return super().add_task(PID, tid, f"img{tid}.png", png_bytes(seed), annotations)

    def project_of(self, prediction: dict) -> int:
        return PID  # the only project: also for predictions a test puts on tasks it did not add

    def record(self, kind: str, path: str, body: Any) -> None:
        super().record(kind, path, body)
        self.calls.append((kind, path, body))

    def writes(self) -> list[tuple[str, str, Any]]:
        with self.lock:
            return list(self.calls)


# ------------------------------------------------------------------------------ fixtures
def counting_proposals(eng: Engine) -> Engine:
    """The engine, counting its propose calls in `propose_calls`."""
    eng.propose_calls = 0
    real = eng.propose

    def counting(image, *args, **kwargs):
        eng.propose_calls += 1
        return real(image, *args, **kwargs)

    eng.propose = counting
    return eng


@pytest.fixture(scope="module")
def engine():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    # iou_threshold 0: random weights predict IoUs anywhere in (0, 1)
    return counting_proposals(Engine(EngineConfig(
        sam_model="sam2.1-t", dino_model="dinov2-s", random_weights=True, device="cpu",
        options=MethodOptions(sam_image_size=256, dino_image_size=112, points_per_side=2, iou_threshold=0.0,
                              compile_decoder=False))))


@pytest.fixture(scope="module")
def other_engine(engine):
    """`engine`'s models and options with other weights (as after swapping a checkpoint)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(model.checkpoints, "RANDOM_WEIGHTS_SEED", 1)
        return counting_proposals(Engine(engine.config))


@pytest.fixture
def ls():
    fake = FakeLS()
    yield fake
    fake.close()


@pytest.fixture
def env(engine, ls, tmp_path, monkeypatch):
    """runtime wired to the fake LS, a fresh Redis prefix, the shared engine; enqueue recorded."""
    settings = Settings.from_env({
        "MODEL_DIR": str(tmp_path), "LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": TOKEN,
        "NTT_SAM_MODEL": "sam2.1-t", "NTT_DINO_MODEL": "dinov2-s", "NTT_RANDOM_WEIGHTS": "1",
        "NTT_DEVICE": "cpu", "SCORE_THRESHOLD": "0"})
    prefix = f"ntt-test-{uuid.uuid4().hex[:10]}:"
    store = RedisStore("redis://127.0.0.1:6379/0", prefix=prefix)
    runtime.reset()
    runtime.configure(settings=settings, store=store, engine=engine)
    enqueued: list[tuple] = []

    def fake_enqueue(func_path, *args, queue="predict", job_id=None, meta=None, **kwargs):
        enqueued.append((func_path, args, queue, job_id, kwargs))
        return job_id or f"job-{len(enqueued)}"

    monkeypatch.setattr(queueing, "enqueue", fake_enqueue)
    engine.propose_calls = 0
    yield enqueued
    runtime.reset()
    keys = list(store.redis.scan_iter(match=prefix + "*"))
    if keys:
        store.redis.delete(*keys)


def polygon_region(rid: str, label: str, pts) -> dict:
    return {"id": rid, "from_name": "poly", "to_name": "image", "type": "polygonlabels",
            "original_width": 80, "original_height": 60, "image_rotation": 0,
            "value": {"points": pts, "closed": True, "polygonlabels": [label]}}


def rectangle_region(rid: str, label: str) -> dict:
    return {"id": rid, "from_name": "box", "to_name": "image", "type": "rectanglelabels",
            "original_width": 80, "original_height": 60, "image_rotation": 0,
            "value": {"x": 10, "y": 16, "width": 40, "height": 42, "rotation": 0, "rectanglelabels": [label]}}


CAT = [[10, 16], [50, 16], [50, 58], [10, 58]]     # the red blob, in percent
DOG = [[56, 50], [94, 50], [94, 92], [56, 92]]     # the blue blob


def annotation(aid: int, tid: int, regions, cancelled=False) -> dict:
    return {"id": aid, "task": tid, "result": regions, "was_cancelled": cancelled}


def webhook(ls: FakeLS, event: str, ann: dict) -> dict:
    """Save `ann` in the fake LS, as a user's submit does, then apply the webhook LS sends for it."""
    ls.save_annotation(ann)
    return apply_webhook(PID, event, {"action": event, "annotation": ann, "task": ls.tasks[ann["task"]],
                                           "project": {"id": PID, "label_config": LABEL_CONFIG}})


def refresh_calls(enqueued) -> list[tuple]:
    return [e for e in enqueued if e[0] == "backend.jobs.refresh.refresh_project"]


def predict(task: dict, **kwargs) -> dict:
    """predict_task of a task of the fake LS, queued as the web queues it (id, image URL, config hash)."""
    digest = label_configs.put(runtime.get_store(), LABEL_CONFIG)
    return predict_task(PID, task["id"], task["data"]["image"], digest, **kwargs)


def ctx() -> JobContext:
    return JobContext.for_project(PID)


# ------------------------------------------------------------------------------ tests
def test_model_version_names_the_engine_without_loading_it(env, engine):
    assert runtime.engine_name() == engine.name == "sam2.1-t+dinov2-s"
    assert runtime.model_version(PID) == f"ntt-sam2.1-t+dinov2-s@{engine.fingerprint[:8]}-empty"


def test_webhooks_create_update_delete_and_cancel(env, ls, engine):
    ls.add_task(1, seed=1)
    banks = runtime.get_bank_store()
    out = webhook(ls, "ANNOTATION_CREATED", annotation(11, 1, [polygon_region("a", "Cat", CAT),
                                                                polygon_region("b", "Dog", DOG),
                                                                rectangle_region("r", "Cat")]))
    assert out["references"] == 3 and out["changed"] is True
    bank = banks.get(PID)
    assert len(bank) == 3 and bank.classes == ["Cat", "Dog"]
    assert sorted(r.ref_id for c in bank.classes for r in bank.refs(c)) == ["11:a", "11:b", "11:r"]
    v1 = banks.version(PID)
    assert out["version"] == v1 != "empty"
    assert runtime.model_version(PID) == f"ntt-sam2.1-t+dinov2-s@{engine.fingerprint[:8]}-{v1}"
    assert [e[1] for e in refresh_calls(env)] == [(PID,)]
    assert banks.label_config(PID) == LABEL_CONFIG

    # the update replaces the annotation's references: one region now, not three
    out = webhook(ls, "ANNOTATION_UPDATED", annotation(11, 1, [polygon_region("c", "Dog", DOG)]))
    bank = banks.get(PID)
    assert out["references"] == 1 and len(bank) == 1 and [r.ref_id for r in bank.refs("Dog")] == ["11:c"]
    assert out["version"] != v1

    # a second annotation adds; a repeat of the same event (retry) changes nothing
    webhook(ls, "ANNOTATION_CREATED", annotation(12, 1, [polygon_region("d", "Cat", CAT)]))
    v3 = banks.version(PID)
    again = webhook(ls, "ANNOTATION_CREATED", annotation(12, 1, [polygon_region("d", "Cat", CAT)]))
    assert again["changed"] is False and banks.version(PID) == v3 and len(banks.get(PID)) == 2

    # a cancelled (skipped) annotation contributes nothing, and removes what it had
    webhook(ls, "ANNOTATION_UPDATED", annotation(12, 1, [polygon_region("d", "Cat", CAT)], cancelled=True))
    assert [r.ref_id for c in banks.get(PID).classes for r in banks.get(PID).refs(c)] == ["11:c"]

    ls.delete_annotation(11)
    out = apply_webhook(PID, "ANNOTATIONS_DELETED", {"action": "ANNOTATIONS_DELETED",
                                                          "annotations": [{"id": 11}, {"id": 99}]})
    assert out["changed"] is True and len(banks.get(PID)) == 0 and banks.version(PID) == "empty"
    assert len(refresh_calls(env)) == 5  # created, updated, created, cancelled, deleted (not the no-op retry)

    assert apply_webhook(PID, "TASKS_CREATED", {"action": "TASKS_CREATED"})["status"] == "ignored"


def test_project_updated_rebuilds_only_when_the_config_changes(env, ls):
    ls.add_task(1, seed=1, annotations=[annotation(21, 1, [polygon_region("a", "Cat", CAT)])])
    ls.add_task(2, seed=2, annotations=[annotation(22, 2, [polygon_region("b", "Dog", DOG)]),
                                        annotation(23, 2, [polygon_region("c", "Dog", CAT)], cancelled=True)])
    ls.add_task(3, seed=3)
    payload = {"action": "PROJECT_UPDATED", "project": {"id": PID, "label_config": LABEL_CONFIG}}
    out = apply_webhook(PID, "PROJECT_UPDATED", payload)  # first sight: build from LS
    assert out["rebuild"]["references"] == 2 and out["rebuild"]["tasks"] == 2
    bank = runtime.get_bank_store().get(PID)
    assert sorted(r.ref_id for c in bank.classes for r in bank.refs(c)) == ["21:a", "22:b"]
    assert apply_webhook(PID, "PROJECT_UPDATED", payload)["status"] == "label config unchanged"


OTHER_CONFIG = LABEL_CONFIG.replace('"Dog"', '"Horse"')


def test_a_forged_annotation_webhook_changes_nothing(env, ls, caplog):
    """Anyone can POST /webhook: the annotation, its task and the label config are read back from
    LS; an annotation LS does not hold (or holds in another project) changes nothing."""
    ls.add_task(1, seed=1)
    ls.add_project(8, LABEL_CONFIG)
    ls.tasks[50] = {"id": 50, "project": 8, "data": {"image": "/data/upload/7/img1.png"},
                    "annotations": [annotation(60, 50, [polygon_region("x", "Dog", DOG)])]}
    banks = runtime.get_bank_store()
    forged = [annotation(55, 1, [polygon_region("f", "Dog", DOG)]),   # LS never had it
              annotation(60, 1, [polygon_region("x", "Dog", DOG)])]   # LS has it, in project 8
    for ann in forged:
        out = apply_webhook(PID, "ANNOTATION_CREATED", {
            "action": "ANNOTATION_CREATED", "annotation": ann, "task": ls.tasks[1],
            "project": {"id": PID, "label_config": OTHER_CONFIG}})
        assert out["status"] == "annotation not in Label Studio", out
    assert banks.version(PID) == "empty" and refresh_calls(env) == []
    assert banks.label_config(PID) == LABEL_CONFIG                  # LS's config, not the payload's
    assert "Label Studio holds no annotation 55" in caplog.text

    # a real annotation: its regions as LS holds them, not as the payload claims
    ls.tasks[1]["annotations"] = [annotation(12, 1, [polygon_region("a", "Cat", CAT)])]
    out = apply_webhook(PID, "ANNOTATION_UPDATED", {
        "action": "ANNOTATION_UPDATED", "annotation": annotation(12, 1, [polygon_region("z", "Dog", DOG)]),
        "task": {"id": 1, "data": {"image": "http://elsewhere.example/x.png"}}, "project": {"id": PID}})
    assert out["references"] == 1 and out["changed"] is True
    assert [r.ref_id for c in banks.get(PID).classes for r in banks.get(PID).refs(c)] == ["12:a"]

    # deletions LS did not make remove nothing; a project LS does not have is left alone
    v1 = banks.version(PID)
    out = apply_webhook(PID, "ANNOTATIONS_DELETED", {"action": "ANNOTATIONS_DELETED",
                                                          "annotations": [{"id": 12}]})
    assert out["removed"] == 0 and out["changed"] is False and banks.version(PID) == v1
    assert len(refresh_calls(env)) == 1
    out = apply_webhook(99, "ANNOTATION_CREATED", {"action": "ANNOTATION_CREATED", "annotation": forged[0],
                                                        "project": {"id": 99, "label_config": LABEL_CONFIG}})
    assert out["status"] == "project not in Label Studio" and banks.label_config(99) is None


def test_project_events_act_on_label_studio_not_the_payload(env, ls):
    """PROJECT_UPDATED reads the label config from LS; START_TRAINING for a project LS does not
    have does nothing (and does not fail)."""
    ls.add_task(1, seed=1, annotations=[annotation(21, 1, [polygon_region("a", "Cat", CAT)])])
    banks = runtime.get_bank_store()
    rebuild_bank(PID)
    v1 = banks.version(PID)
    forged = {"action": "PROJECT_UPDATED", "project": {"id": PID, "label_config": OTHER_CONFIG}}
    assert apply_webhook(PID, "PROJECT_UPDATED", forged)["status"] == "label config unchanged"
    assert banks.label_config(PID) == LABEL_CONFIG and banks.version(PID) == v1
    ls.add_task(2, seed=2, annotations=[annotation(22, 2, [polygon_region("b", "Dog", DOG)])])  # imported
    out = apply_webhook(PID, "ANNOTATIONS_CREATED", {"action": "ANNOTATIONS_CREATED", "project": {"id": PID}})
    assert out["rebuild"]["references"] == 2 and banks.version(PID) != v1
    out = train_project(99)
    assert out["status"] == "project not in Label Studio" and ls.writes() == []


def test_tasks_deleted_forgets_only_tasks_label_studio_deleted(env, ls):
    """Deleted tasks leave the registry (refreshes stop posting to them); a task LS still has stays."""
    registry = runtime.get_registry()
    for tid in (2, 3, 4):
        ls.add_task(tid, seed=tid)
    registry.update(PID, {tid: {"image_url": f"/data/upload/7/img{tid}.png"} for tid in (2, 3, 4)})
    del ls.tasks[3]
    out = apply_webhook(PID, "TASKS_DELETED", {"action": "TASKS_DELETED", "project": {"id": PID},
                                                    "tasks": [{"id": 2}, {"id": 3}, {"id": 77}]})
    assert out["forgotten"] == 1 and sorted(registry.all(PID)) == [2, 4]


def test_predict_task_empty_bank_runs_no_model(env, ls, engine):
    task = ls.add_task(1, seed=1)
    item = predict(task)
    assert item == {"result": [], "score": 0.0, "model_version": f"ntt-sam2.1-t+dinov2-s@{engine.fingerprint[:8]}-empty"}
    assert engine.propose_calls == 0
    assert runtime.get_registry().get(PID, 1).image_url == task["data"]["image"]


def _bank_from(ls, env):
    ls.add_task(1, seed=1)
    webhook(ls, "ANNOTATION_CREATED", annotation(11, 1, [polygon_region("a", "Cat", CAT)]))
    env.clear()


def test_predict_task_cold_then_cache_hit_identical(env, ls, engine):
    _bank_from(ls, env)
    task = ls.add_task(2, seed=2)
    cold = predict(task)
    assert engine.propose_calls == 1
    assert cold["model_version"] == runtime.model_version(PID)
    assert len(cold["result"]) >= 2  # polygons and rectangles (threshold 0)
    assert {r["from_name"] for r in cold["result"]} == {"poly", "box"}
    assert all(r["value"][r["type"]] == ["Cat"] for r in cold["result"])
    hit = predict(task)
    assert engine.propose_calls == 1  # proposals came from the cache
    assert result_hash(hit["result"]) == result_hash(cold["result"]) and hit["score"] == cold["score"]
    record = runtime.get_registry().get(PID, 2)
    assert record.proposal_key and record.result_hash == result_hash(cold["result"])
    # the masks the cold match upsampled are kept beside the proposals; the hit read them back
    cached = runtime.get_proposal_cache().get(record.proposal_key)
    assert len(runtime.get_proposal_cache().get_masks(record.proposal_key, cached)) > 0
    assert record.model_version == cold["model_version"] and record.prediction_id is None
    assert ls.writes() == []  # delivered by the web's answer, not through the API


def test_a_display_cap_cuts_the_methods_top_k_and_does_not_set_k(env):
    """MAX_DETECTIONS cuts the regions of the method's top-K (K = 100); it is not passed as K,
    whose pre-merge cap (8 * K NMS survivors) would let only the first 16 by SAM IoU compete."""
    runtime.configure(settings=replace(runtime.get_settings(), max_detections=2))
    n, side = 20, 64
    logits = torch.full((n, side, side), -5.0)
    for i in range(n):                                   # 20 separate squares: NMS keeps them all
        x, y = 12 * (i % 5), 12 * (i // 5)
        logits[i, y:y + 10, x:x + 10] = 5.0
    scores = torch.linspace(0.1, 0.9, n)                 # best scores on the lowest SAM IoUs
    descriptors = torch.stack([scores, (1 - scores ** 2).sqrt()], dim=1)
    proposals = Proposals(logits, torch.linspace(0.99, 0.5, n), descriptors, (60, 80))
    bank = MemoryBank()
    bank.add("Cat", "r", [1.0, 0.0])
    item = match_item(ctx(), proposals, "ab" * 32, bank, parse_label_config(LABEL_CONFIG), "mv")
    by_control = {}
    for region in item["result"]:
        by_control.setdefault(region["from_name"], []).append(round(region["score"], 4))
    assert by_control == {"poly": [0.9, 0.8579], "box": [0.9, 0.8579]}


def test_late_delivery_posts_through_the_api_exactly_once(env, ls):
    _bank_from(ls, env)
    store = runtime.get_store()
    task = ls.add_task(3, seed=3)
    # in time: the job wins the claim, the web returns the item, nothing is posted
    item = predict(task, delivery_key="delivery:a")
    assert store.claim("delivery:a", "api") == "web" and ls.writes() == []
    # too late: the web claimed first, so the job posts it itself
    assert store.claim("delivery:b", "api") == "api"
    late = predict(task, delivery_key="delivery:b")
    writes = ls.writes()
    assert [w[0] for w in writes] == ["POST"]
    assert writes[0][2] == {"task": 3, "result": late["result"], "score": late["score"],
                            "model_version": late["model_version"]}
    assert result_hash(late["result"]) == result_hash(item["result"])
    # a retry of the same job posts nothing more
    predict(task, delivery_key="delivery:b")
    assert len(ls.writes()) == 1
    assert runtime.get_registry().get(PID, 3).prediction_id == 100


def test_refresh_rescores_cached_tasks_without_proposing(env, ls, engine):
    _bank_from(ls, env)
    for tid in (2, 3, 4):
        predict(ls.add_task(tid, seed=tid))  # delivered by the web
    uncached = ls.add_task(5, seed=5)
    runtime.get_registry().update(PID, {5: {"image_url": uncached["data"]["image"]}})
    # LS stored the web's answers: one of them is already ours in LS
    ls.predictions[500] = {"id": 500, "task": 2, "result": [], "model_version": "ntt-old"}
    assert engine.propose_calls == 3

    # the reference is relabelled Dog: the bank changes, and every region found becomes a Dog
    # (a new reference of another class may or may not win a proposal of a random-weight model)
    webhook(ls, "ANNOTATION_UPDATED", annotation(11, 1, [polygon_region("a", "Dog", CAT)]))
    bank = runtime.get_bank_store().get(PID)
    assert bank.classes == ["Dog"]
    rescored = {tid: (item, changed) for tid, item, changed in rescore_cached(ctx(), bank)}
    assert set(rescored) == {2, 3, 4}
    assert engine.propose_calls == 3
    for item, changed in rescored.values():
        assert all(r["value"][r["type"]] == ["Dog"] for r in item["result"])
        assert changed == bool(item["result"])
    # pretend task 4's new result is already in LS: unchanged, yet posted under the new version
    same = rescored[4][0]
    runtime.get_registry().update(PID, {4: {"result_hash": result_hash(same["result"])}})
    changed_results = {tid for tid, (_, changed) in rescored.items() if changed and tid != 4}
    assert changed_results, "the Dog reference should change at least one result"

    summary = refresh_project(PID)
    assert engine.propose_calls == 3  # no SAM2/DINOv2 run for cached tasks
    assert summary["rescored"] == 3 and summary["enqueued"] == 1
    assert summary["changed"] == len(changed_results) and summary["posted"] == 3
    writes = ls.writes()
    posted_tasks = set()
    for method, path, body in writes:
        tid = body["task"] if method == "POST" else ls.predictions[int(path.rstrip("/").rsplit("/", 1)[1])]["task"]
        posted_tasks.add(tid)
        assert body["model_version"] == runtime.model_version(PID)
        assert result_hash(body["result"]) == result_hash(rescored[tid][0]["result"])
    assert posted_tasks == {2, 3, 4}
    # our prediction found in LS is PATCHed, not duplicated
    assert [p for m, p, _ in writes if m == "PATCH"] == ["/api/predictions/500/"]
    assert not any(m == "POST" and b["task"] == 2 for m, _, b in writes)
    # the uncached task is queued as a predict job that delivers through the API
    (func, args, queue, job_id, _), = [e for e in env if e[0] == "backend.jobs.predict.predict_task"]
    assert queue == "predict" and args[:3] == (PID, 5, uncached["data"]["image"])
    assert label_configs.get(runtime.get_store(), args[3]) == LABEL_CONFIG
    assert runtime.get_store().claim(args[4], "web") == "api"

    # a second refresh for the same bank has nothing left to do
    again = refresh_project(PID)
    assert again["posted"] == 0 and again["enqueued"] == 0
    assert len(ls.writes()) == len(writes)


def test_rescore_threads_give_the_same_items_in_task_order(env, ls, engine):
    """REFRESH_THREADS re-scores several tasks at once: same items, same order, as one thread."""
    _bank_from(ls, env)
    for tid in (2, 3, 4, 5):
        predict(ls.add_task(tid, seed=tid))
    records = dict(sorted(runtime.get_registry().all(PID).items(), reverse=True))  # not id order
    bank = runtime.get_bank_store().get(PID)
    settings = runtime.get_settings()
    out = {}
    for threads in (1, 3):
        runtime.configure(settings=replace(settings, refresh_threads=threads))
        out[threads] = [(tid, result_hash(item["result"]), item["score"], item["model_version"], changed)
                        for tid, item, changed in rescore_cached(ctx(), bank, records=records)]
    assert out[1] == out[3]
    assert [(row[0], row[-1]) for row in out[3]] == [(tid, False) for tid in records]  # as delivered
    assert any(row[1] != result_hash([]) for row in out[3])  # something was found to compare
    assert engine.propose_calls == 4


def test_refresh_moves_unchanged_predictions_to_the_new_version(env, ls, engine):
    """A bank change that leaves a task's result as it was still gives its prediction the new
    model_version (a PATCH of the version alone): LS treats another version as stale, and the next
    "Retrieve predictions" would add a second prediction of ours."""
    _bank_from(ls, env)
    registry = runtime.get_registry()
    for tid in (2, 3):  # delivered through the API: our prediction ids are known
        assert runtime.get_store().claim(f"delivery:{tid}", "api") == "api"
        predict(ls.add_task(tid, seed=tid), delivery_key=f"delivery:{tid}")
    webhook(ls, "ANNOTATION_CREATED", annotation(12, 1, [polygon_region("b", "Dog", DOG)]))
    mv = runtime.model_version(PID)
    # what LS holds under the old version is what the new bank finds: unchanged results
    for tid, item, _ in rescore_cached(ctx(), runtime.get_bank_store().get(PID)):
        ls.predictions[registry.get(PID, tid).prediction_id]["result"] = item["result"]
        registry.update(PID, {tid: {"result_hash": result_hash(item["result"])}})
    before = len(ls.writes())
    summary = refresh_project(PID)
    assert summary["rescored"] == 2 and summary["changed"] == 0 and summary["posted"] == 2
    assert [(kind, body) for kind, _, body in ls.writes()[before:]] == [("PATCH", {"model_version": mv})] * 2
    assert sorted((p["task"], p["model_version"]) for p in ls.predictions.values()) == [(2, mv), (3, mv)]
    assert refresh_project(PID)["rescored"] == 0


def _many_cached_tasks(ls, n: int, first: int = 100) -> str:
    """n registered tasks sharing the cached proposals of one predicted image, each holding our
    prediction in LS under the current (soon old) model_version. Returns that version."""
    base = predict(ls.add_task(first, seed=3))
    record = runtime.get_registry().get(PID, first)
    old = base["model_version"]
    for k, tid in enumerate(range(first, first + n)):
        ls.tasks.setdefault(tid, {**ls.tasks[first], "id": tid})
        ls.predictions[900 + k] = {"id": 900 + k, "task": tid, "result": base["result"], "model_version": old}
        runtime.get_registry().update(PID, {tid: {"image_url": record.image_url, "image_sha256": record.image_sha256,
                                                  "proposal_key": record.proposal_key, "model_version": old,
                                                  "result_hash": result_hash(base["result"])}})
    return old


def test_refresh_of_many_tasks_replaces_predictions_in_bulk(env, ls, engine, monkeypatch):
    """>= BULK_MIN_TASKS cached tasks: few large imports, then the old version deleted; every
    task ends with exactly one prediction of ours, under the new version, and no PATCH is sent."""
    _bank_from(ls, env)
    ls.predictions[800] = {"id": 800, "task": 1, "result": [], "model_version": "someone-else"}
    old = _many_cached_tasks(ls, 60)
    webhook(ls, "ANNOTATION_CREATED", annotation(12, 1, [polygon_region("b", "Dog", DOG)]))
    mv = runtime.model_version(PID)
    summary = refresh_project(PID)
    assert summary["bulk"] is True and summary["rescored"] == summary["posted"] == 60
    assert summary["retired"] == 60 and summary["failed"] == 0 and engine.propose_calls == 1
    assert [(c[0], len(c[2]) if c[0] == "IMPORT" else c[2]) for c in ls.writes()] == [
        ("IMPORT", 60), ("DELETE-VERSION", {"model_version": old})]
    held = {}
    for p in ls.predictions.values():
        held.setdefault(p["task"], []).append(p["model_version"])
    assert all(held[tid] == [mv] for tid in range(100, 160))
    assert held[1] == ["someone-else"]                              # not ours: untouched
    assert all(runtime.get_registry().get(PID, tid).model_version == mv for tid in range(100, 160))
    again = refresh_project(PID)
    assert again["rescored"] == 0 and len(ls.writes()) == 2

    # at most BULK_IMPORT_ITEMS per request: 60 tasks with a cap of 25 -> 50 (two refresh batches) + 10
    monkeypatch.setattr(bulk_delivery, "BULK_IMPORT_ITEMS", 25)
    webhook(ls, "ANNOTATION_CREATED", annotation(13, 1, [polygon_region("c", "Cat", CAT)]))
    summary = refresh_project(PID)
    assert [len(c[2]) for c in ls.writes()[2:] if c[0] == "IMPORT"] == [50, 10] and summary["retired"] == 60


def test_bulk_refresh_survives_label_studio_refusing_the_bulk_routes(env, ls, engine, monkeypatch, caplog):
    """A token without the right to import (403) falls back to PATCHes; one that cannot delete the
    old version leaves it for the next refresh, and the job still succeeds."""
    _bank_from(ls, env)
    old = _many_cached_tasks(ls, 25)
    webhook(ls, "ANNOTATION_CREATED", annotation(12, 1, [polygon_region("b", "Dog", DOG)]))
    real = ls.handle

    def refuse(path_part):
        def handle(req, method, path, query):
            if path_part in path and method in ("POST", "DELETE"):
                return Reply(403, {"detail": "You do not have permission to perform this action."})
            return real(req, method, path, query)
        return handle

    monkeypatch.setattr(ls, "handle", refuse("/model-versions/"))
    summary = refresh_project(PID)
    assert summary["bulk"] is True and summary["posted"] == 25 and summary["retired"] == 0
    assert f"deleting our model versions older than {runtime.model_version(PID)} failed" in caplog.text
    assert sum(p["model_version"] == old for p in ls.predictions.values()) == 25   # left for later
    # the job's retry (or any later refresh) finds nothing stale and retires the old version
    monkeypatch.setattr(ls, "handle", real)
    again = refresh_project(PID)
    assert again["rescored"] == 0 and again["retired"] == 25
    assert {p["model_version"] for p in ls.predictions.values() if p["task"] >= 100} == {runtime.model_version(PID)}

    webhook(ls, "ANNOTATION_CREATED", annotation(13, 1, [polygon_region("c", "Cat", CAT)]))
    # whatever the random model makes of it, every task's result counts as changed
    runtime.get_registry().update(PID, {t: {"result_hash": "from-an-older-bank"} for t in range(100, 125)})
    monkeypatch.setattr(ls, "handle", refuse("/import/predictions"))
    before = len(ls.writes())
    summary = refresh_project(PID)
    assert summary["bulk"] is True and "bulk import failed" in caplog.text
    assert summary["failed"] == 0 and summary["posted"] == summary["changed"] == 25 and summary["retired"] == 0
    assert [c[0] for c in ls.writes()[before:]] == ["PATCH"] * 25


def test_bulk_plan_guards(env, ls, engine, monkeypatch):
    """When bulk replacement is allowed: enough tasks, the setting on, a listable project, no task
    already holding the new version; old predictions on tasks that already hold it are fine."""
    _bank_from(ls, env)
    old = _many_cached_tasks(ls, 30)
    records = runtime.get_registry().all(PID)
    mv = "ntt-new"
    assert bulk_delivery.plan(ctx(), records, mv, "ntt-") == [old]
    assert bulk_delivery.plan(ctx(), dict(list(records.items())[:bulk_delivery.BULK_MIN_TASKS - 1]), mv, "ntt-") is None
    # an old prediction outside the re-posted tasks, on a task that already holds the new version
    ls.predictions[990] = {"id": 990, "task": 555, "result": [], "model_version": old}
    ls.predictions[991] = {"id": 991, "task": 555, "result": [], "model_version": mv}
    assert bulk_delivery.plan(ctx(), records, mv, "ntt-") == [old]
    ls.predictions[992] = {"id": 992, "task": 100, "result": [], "model_version": mv}   # would duplicate
    assert bulk_delivery.plan(ctx(), records, mv, "ntt-") is None
    del ls.predictions[992]
    monkeypatch.setattr(bulk_delivery, "BULK_MAX_PREDICTIONS", 10)
    assert bulk_delivery.plan(ctx(), records, mv, "ntt-") is None
    monkeypatch.setattr(bulk_delivery, "BULK_MAX_PREDICTIONS", 20_000)
    runtime.configure(settings=replace(runtime.get_settings(), ls_bulk_refresh=False))
    assert bulk_delivery.plan(ctx(), records, mv, "ntt-") is None


def test_bulk_needs_a_complete_listing_and_never_resends_an_import(env, ls, engine, monkeypatch, caplog):
    """A listing that misses predictions LS counts (e.g. a paginated answer) stops both the bulk
    plan and the retiring of old versions; an import answered 504 (LS may still be importing) is not
    sent again, and its tasks are then updated through our newest prediction, not duplicated."""
    _bank_from(ls, env)
    old = _many_cached_tasks(ls, 25)
    records = runtime.get_registry().all(PID)
    real = ls.handle

    def short_listing(req, method, path, query):
        reply = real(req, method, path, query)
        if method == "GET" and path == "/api/predictions/" and "project" in query:
            return Reply(200, json.loads(reply.data)[:-1])
        return reply

    caplog.set_level(logging.INFO, logger="backend.delivery.bulk")
    monkeypatch.setattr(ls, "handle", short_listing)
    assert bulk_delivery.plan(ctx(), records, "ntt-new", "ntt-") is None and "25 counted" in caplog.text
    for k, tid in enumerate(range(100, 125)):   # every task holds the new version: retirable...
        ls.predictions[2000 + k] = {"id": 2000 + k, "task": tid, "result": [], "model_version": "ntt-new"}
    assert bulk_delivery.retire(ctx(), "ntt-new", "ntt-") == 0                  # ... but not on a partial list
    monkeypatch.setattr(ls, "handle", real)
    assert bulk_delivery.retire(ctx(), "ntt-new", "ntt-") == 25                 # complete list: retired
    assert not any(p["model_version"] == old for p in ls.predictions.values())
    for k, tid in enumerate(range(100, 125)):   # back to one old prediction per task, known by id
        ls.predictions[2000 + k]["model_version"] = old
        runtime.get_registry().update(PID, {tid: {"prediction_id": 2000 + k}})
    ls._next = 10_000   # as LS: what it creates from now on has the highest ids

    imports = []

    def import_lands_then_504(req, method, path, query):
        reply = real(req, method, path, query)   # LS stores the predictions ...
        if path.endswith("/import/predictions"):
            imports.append(path)
            return Reply(504, {"detail": "gateway timeout"})   # ... but the proxy gives up
        return reply

    monkeypatch.setattr(ls, "handle", import_lands_then_504)
    runtime.get_registry().update(PID, {t: {"result_hash": "from-an-older-bank"} for t in range(100, 125)})
    webhook(ls, "ANNOTATION_CREATED", annotation(12, 1, [polygon_region("b", "Dog", DOG)]))
    mv = runtime.model_version(PID)
    summary = refresh_project(PID)
    assert len(imports) == 1 and summary["failed"] == 0 and summary["posted"] == 25
    for tid in range(100, 125):   # the imported prediction was updated; the old one is still there
        held = sorted(p["model_version"] for p in ls.predictions.values() if p["task"] == tid)
        assert held == sorted([mv, old]), (tid, held)
    monkeypatch.setattr(ls, "handle", real)
    assert refresh_project(PID)["retired"] == 25   # nothing stale: the cleanup retires the old one
    assert {p["model_version"] for p in ls.predictions.values() if p["task"] >= 100} == {mv}


def test_importer_caps_requests_by_bytes(env, ls):
    """Big results (brush RLE of large images) are imported in several requests, none above the cap."""
    importer = bulk_delivery.Importer(ctx(), max_items=1000, max_bytes=20_000)
    runtime.get_registry().update(PID, {t: {"image_url": f"/x/{t}.png"} for t in range(1, 11)})
    for t in range(1, 11):
        ls.tasks[t] = {"id": t, "project": PID, "data": {}}
    item = {"result": [{"value": {"rle": list(range(1500))}}], "score": 0.5, "model_version": "ntt-v"}
    posted = sum(importer.add({t: dict(item)}) for t in range(1, 11)) + importer.flush()
    sizes = [len(c[2]) for c in ls.writes() if c[0] == "IMPORT"]
    assert posted == 10 and sum(sizes) == 10 and len(sizes) > 1
    assert runtime.get_registry().get(PID, 7).model_version == "ntt-v"


def test_failed_bulk_import_moves_unchanged_predictions_too(env, ls, engine, monkeypatch):
    """When the bulk import fails, every task it was to re-post is posted one by one, those whose
    result did not change included: each ends with one prediction of ours, of the new version."""
    _bank_from(ls, env)
    _many_cached_tasks(ls, 25)
    webhook(ls, "ANNOTATION_CREATED", annotation(12, 1, [polygon_region("b", "Dog", DOG)]))
    mv = runtime.model_version(PID)
    registry = runtime.get_registry()
    for tid, item, _ in rescore_cached(ctx(), runtime.get_bank_store().get(PID)):  # results unchanged
        registry.update(PID, {tid: {"result_hash": result_hash(item["result"])}})
    real = ls.handle

    def refuse_import(req, method, path, query):
        if path.endswith("/import/predictions"):
            return Reply(403, {"detail": "You do not have permission to perform this action."})
        return real(req, method, path, query)

    monkeypatch.setattr(ls, "handle", refuse_import)
    summary = refresh_project(PID)
    assert summary["bulk"] is True and summary["changed"] == 0 and summary["posted"] == 25
    for tid in range(100, 125):
        assert [p["model_version"] for p in ls.predictions.values() if p["task"] == tid] == [mv], tid


def test_refresh_goes_task_by_task_when_an_old_prediction_would_be_stranded(env, ls, engine):
    """An old-version prediction on a task that is not re-scored now (here: unknown to the
    registry) must not be deleted: the refresh PATCHes the changed tasks one by one instead."""
    _bank_from(ls, env)
    old = _many_cached_tasks(ls, 30)
    ls.predictions[990] = {"id": 990, "task": 555, "result": [], "model_version": old}
    # whatever the random model makes of the new reference, every task's result counts as changed
    runtime.get_registry().update(PID, {t: {"result_hash": "from-an-older-bank"} for t in range(100, 130)})
    webhook(ls, "ANNOTATION_CREATED", annotation(12, 1, [polygon_region("b", "Dog", DOG)]))
    summary = refresh_project(PID)
    assert summary["bulk"] is False and summary["retired"] == 0
    assert summary["posted"] == summary["changed"] == 30
    assert {c[0] for c in ls.writes()} == {"PATCH"}
    assert ls.predictions[990]["model_version"] == old


def test_delivery_keeps_several_posts_in_flight_and_isolates_a_failure(env):
    """LS_POST_CONCURRENCY posts run at once (a refresh mostly waits on LS); a task LS refuses is
    counted as failed and left unrecorded while the others are recorded."""
    in_flight, peak, lock, gate = [0], [0], threading.Lock(), threading.Event()

    def route(req: Request) -> Reply:
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
            if peak[0] >= 3:
                gate.set()
        gate.wait(10)  # the first posts wait for a third one (a failing run waits 10 s, once)
        gate.set()
        with lock:
            in_flight[0] -= 1
        tid = int(req.path.rstrip("/").rsplit("/", 1)[1]) - 1000
        if tid == 5:
            return Reply(400, {"detail": "invalid result"})
        return Reply(200, {"id": 1000 + tid, **req.json()})

    with RouteServer(route) as srv:
        s = runtime.get_settings()
        runtime.configure(settings=replace(s, label_studio_url=srv.url, ls_post_concurrency=3))
        registry = runtime.get_registry()
        registry.update(PID, {t: {"image_url": f"/x/{t}.png", "prediction_id": 1000 + t} for t in range(1, 9)})
        items = {t: {"result": [{"t": t}], "score": 0.5, "model_version": "mv-2"} for t in range(1, 9)}
        counts = deliver(ctx(), items)
    assert counts == {"posted": 7, "skipped": 0, "failed": 1}
    assert peak[0] == 3
    assert registry.get(PID, 5).model_version != "mv-2"
    assert all(registry.get(PID, t).model_version == "mv-2" for t in range(1, 9) if t != 5)


def test_train_project_posts_every_unlabelled_task_once(env, ls, engine, caplog):
    ls.add_task(1, seed=1, annotations=[annotation(31, 1, [polygon_region("a", "Cat", CAT)])])
    ls.add_task(2, seed=2)
    ls.add_task(3, seed=3)
    ls.tasks[3]["data"]["image"] = "/data/upload/7/missing.png"  # 404: this task fails alone
    ls.add_task(4, seed=4, annotations=[annotation(32, 4, [], cancelled=True)])  # skipped = unlabelled
    out = train_project(PID)
    assert out["rebuild"]["references"] == 1
    assert out["tasks"] == 3 and out["posted"] == 2 and out["failed"] == 1
    posted = sorted(body["task"] for method, _, body in ls.writes() if method == "POST")
    assert posted == [2, 4]
    assert engine.propose_calls == 2
    again = train_project(PID)  # pressing the button twice posts nothing new
    assert again["posted"] == 0 and again["skipped"] == 2 and len(ls.writes()) == 2
    assert "task 3" in caplog.text and TOKEN not in caplog.text


def test_train_project_posts_while_it_predicts_the_next_tasks(env, ls, engine, monkeypatch, caplog):
    """Posting overlaps the next predictions: several posts are in flight at once (the first one
    waits for a second to start), and every one is counted when the job returns."""
    ls.add_task(1, seed=1, annotations=[annotation(31, 1, [polygon_region("a", "Cat", CAT)])])
    for tid in range(2, 8):
        ls.add_task(tid, seed=tid % 3 + 2)  # 3 distinct images: later tasks are cache hits
    in_flight, peak, lock, gate = [0], [0], threading.Lock(), threading.Event()
    real = deliver

    def slow_deliver(job_ctx, items):
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
            if peak[0] >= 2:
                gate.set()
        gate.wait(30)  # the first post waits for the next one (serial posting: 30 s, then a failure)
        gate.set()
        try:
            return real(job_ctx, items)
        finally:
            with lock:
                in_flight[0] -= 1

    monkeypatch.setattr(train_job, "deliver", slow_deliver)
    caplog.set_level(logging.INFO, logger="backend.jobs")
    out = train_project(PID)
    assert out["tasks"] == 6 and out["posted"] == 6 and out["failed"] == 0
    assert peak[0] > 1 and in_flight[0] == 0
    # the last progress line is written once posting ended, with the final counts
    progress = [r.getMessage() for r in caplog.records if "pre-annotat" in r.getMessage()]
    assert progress[-1].endswith("pre-annotated 6 tasks (6 posted, 0 unchanged, 0 failed)"), progress
    assert sorted(body["task"] for method, _, body in ls.writes() if method == "POST") == list(range(2, 8))


def test_ls_connection_falls_back_to_setup_values(env, ls, tmp_path):
    runtime.configure(settings=Settings.from_env({"MODEL_DIR": str(tmp_path), "NTT_SAM_MODEL": "sam2.1-t",
                                                  "NTT_DINO_MODEL": "dinov2-s"}))
    with pytest.raises(LabelStudioAPIError, match="no Label Studio connection"):
        runtime.get_ls_client(PID)
    runtime.get_bank_store().set_ls_connection(PID, ls.url, TOKEN)  # what /setup received
    client = runtime.get_ls_client(PID)
    assert client.url == ls.url and client.get_project(PID)["label_config"] == LABEL_CONFIG
    assert runtime.get_fetcher(PID).ls_url == ls.url


def test_engine_is_built_once_from_the_settings(monkeypatch, tmp_path):
    import model.engine

    built = []

    class Recorder:
        name, fingerprint = "sam2-s+dinov2-b", "0123456789abcdef"

        def __init__(self, config):
            built.append(config)

    monkeypatch.setattr(model.engine, "Engine", Recorder)
    env = {"MODEL_DIR": str(tmp_path), "NTT_SAM_MODEL": "sam2-s", "NTT_DINO_MODEL": "dinov2-b",
           "NTT_DEVICE": "cpu", "NTT_SAM_IMAGE_SIZE": "512", "NTT_POINTS_PER_SIDE": "8"}
    try:
        for random in ("0", "1"):
            runtime.reset()
            runtime.configure(settings=Settings.from_env({**env, "NTT_RANDOM_WEIGHTS": random}))
            first = runtime.get_engine()
            assert runtime.get_engine() is first
    finally:
        runtime.reset()
    real, rand = built
    assert (real.sam_model, real.dino_model, real.device) == ("sam2-s", "dinov2-b", "cpu")
    assert real.sam_checkpoint == str(tmp_path / "checkpoints" / "sam2_hiera_small.pt")
    assert real.dino_checkpoint == str(tmp_path / "checkpoints" / "dinov2_vitb14_pretrain.pth")
    assert real.random_weights is False
    assert (real.options.sam_image_size, real.options.points_per_side, real.options.dino_image_size) == (512, 8, 518)
    assert rand.random_weights is True and rand.sam_checkpoint is None and rand.dino_checkpoint is None


def test_bank_of_another_engine_is_rebuilt_not_matched(env, ls, engine):
    _bank_from(ls, env)
    banks = runtime.get_bank_store()
    banks.update(PID, lambda bank: None, basis={"engine": "sam2-l+dinov2-l", "config": "x"})
    task = ls.add_task(2, seed=2)
    for _ in range(2):
        item = predict(task)
        assert item["result"] == [] and item["model_version"].endswith("-empty")
    assert engine.propose_calls == 0
    assert [(e[0], e[2]) for e in env] == [("backend.jobs.bank.rebuild_bank", "bank")]  # queued once


# ------------------------------------------------------------------------------ swapped weights
def _bank_of_first_weights(ls, env, engine) -> str:
    """A bank built from task 1's annotation in LS, then task 2 predicted (its proposals cached),
    all with `engine`; returns task 2's proposal-cache key."""
    ann = annotation(11, 1, [polygon_region("a", "Cat", CAT)])
    ls.add_task(1, seed=1, annotations=[ann])
    webhook(ls, "ANNOTATION_CREATED", ann)
    predict(ls.add_task(2, seed=2))
    assert engine.propose_calls == 1 and runtime.get_bank_store().basis(PID)["weights"] == engine.fingerprint
    env.clear()
    return runtime.get_registry().get(PID, 2).proposal_key


def test_bank_of_other_weights_is_rebuilt_and_model_version_changes(env, ls, engine, other_engine):
    assert other_engine.name == engine.name and other_engine.fingerprint != engine.fingerprint
    _bank_of_first_weights(ls, env, engine)
    banks = runtime.get_bank_store()
    version, mv, old_basis = banks.version(PID), runtime.model_version(PID), basis(ctx(), LABEL_CONFIG)

    runtime.configure(engine=other_engine)  # the workers restarted with a fine-tuned checkpoint
    assert basis(ctx(), LABEL_CONFIG) != old_basis
    assert runtime.model_version(PID) != mv  # LS predicts again
    item = predict(ls.tasks[2])  # the old references are not matched
    assert item["result"] == [] and item["model_version"].endswith("-empty")
    assert [(e[0], e[2]) for e in env] == [("backend.jobs.bank.rebuild_bank", "bank")]
    out = rebuild_bank(PID, refresh=False)
    assert out["references"] == 1 and banks.basis(PID)["weights"] == other_engine.fingerprint
    assert banks.version(PID) != version and runtime.model_version(PID) not in (mv, item["model_version"])


def test_proposals_of_other_weights_are_not_reused(env, ls, engine, other_engine):
    first_key = _bank_of_first_weights(ls, env, engine)
    runtime.configure(engine=other_engine)
    rebuild_bank(PID, refresh=False)
    other_engine.propose_calls = 0
    item = predict(ls.tasks[2])
    assert other_engine.propose_calls == 1 and item["result"]  # proposed again, not read from the cache
    assert runtime.get_registry().get(PID, 2).proposal_key != first_key


def test_refresh_does_not_rescore_proposals_of_other_weights(env, ls, engine, other_engine):
    _bank_of_first_weights(ls, env, engine)
    runtime.configure(engine=other_engine)
    rebuild_bank(PID, refresh=False)
    out = refresh_project(PID)
    assert (out["rescored"], out["enqueued"]) == (0, 1)  # task 2 is predicted again, by the new weights
    assert [e[1][1] for e in env if e[0] == "backend.jobs.predict.predict_task"] == [2]


def test_web_model_version_follows_the_weights_the_workers_published(env, engine, other_engine, monkeypatch):
    import model.engine

    settings, store = runtime.get_settings(), runtime.get_store()

    def web() -> str:
        """model_version as the web process computes it: it never loads a model."""
        runtime.reset()
        runtime.configure(settings=settings, store=store)
        return runtime.model_version(PID)

    assert web() == "ntt-sam2.1-t+dinov2-s-empty"  # no worker has loaded an engine yet
    for eng in (engine, other_engine):  # a worker starts and loads its engine
        monkeypatch.setattr(model.engine, "Engine", lambda config, eng=eng: eng)
        runtime.reset()
        runtime.configure(settings=settings, store=store)
        assert runtime.get_engine() is eng
        assert web() == f"ntt-sam2.1-t+dinov2-s@{eng.fingerprint[:8]}-empty"


# ------------------------------------------------------------------------------ services per job
def test_a_job_builds_its_context_once_and_looks_each_service_up_once(env, ls, engine, monkeypatch):
    """Every job builds one JobContext and hands it down (train runs a rebuild and a
    pre-annotation of every task, refresh re-scores and posts): the LS client, the image
    fetcher, the engine, the proposal cache and the registry are each looked up once per job."""
    built, lookups = [], {}
    real_for_project = JobContext.for_project.__func__

    def counting_for_project(cls, pid):
        built.append(pid)
        return real_for_project(cls, pid)

    monkeypatch.setattr(JobContext, "for_project", classmethod(counting_for_project))
    for name in ("get_ls_client", "get_fetcher", "get_engine", "get_proposal_cache", "get_registry"):
        def counted(*args, _real=getattr(runtime, name), _name=name):
            lookups[_name] = lookups.get(_name, 0) + 1
            return _real(*args)
        monkeypatch.setattr(runtime, name, counted)

    ls.add_task(1, seed=1, annotations=[annotation(31, 1, [polygon_region("a", "Cat", CAT)])])
    for tid in (2, 3, 4):
        ls.add_task(tid, seed=tid)
    jobs_run = [lambda: train_project(PID),
                lambda: webhook(ls, "ANNOTATION_UPDATED", annotation(31, 1, [polygon_region("a", "Dog", CAT)])),
                lambda: refresh_project(PID),
                lambda: predict(ls.tasks[2], delivery_key="delivery:x")]
    for run in jobs_run:
        built.clear()
        lookups.clear()
        run()
        assert built == [PID], built
        assert lookups and all(n == 1 for n in lookups.values()), lookups


def test_train_lists_the_project_once(env, ls, engine, monkeypatch):
    """The rebuild and the pre-annotation share one listing of the project's tasks."""
    ls.add_task(1, seed=1, annotations=[annotation(31, 1, [polygon_region("a", "Cat", CAT)])])
    ls.add_task(2, seed=2)
    ls.add_task(3, seed=3)
    listings, real = [], ls.handle

    def counting(req, method, path, query):
        if method == "GET" and path == "/api/tasks/" and "query" not in query:  # not a get_tasks by id
            listings.append(query.get("page", ["1"])[0])
        return real(req, method, path, query)

    monkeypatch.setattr(ls, "handle", counting)
    out = train_project(PID)
    assert out["rebuild"]["references"] == 1 and out["tasks"] == 2 and out["posted"] == 2
    assert listings == ["1"]


def test_refresh_reads_each_registry_record_once(env, ls, engine, monkeypatch):
    """refresh_project reads the project's records in one `all` and hands them to the posting:
    no record is read again (writes re-read under their lock, which is not counted)."""
    _bank_from(ls, env)
    for tid in (2, 3, 4):
        assert runtime.get_store().claim(f"delivery:{tid}", "api") == "api"
        predict(ls.add_task(tid, seed=tid), delivery_key=f"delivery:{tid}")  # our prediction ids known
    webhook(ls, "ANNOTATION_CREATED", annotation(12, 1, [polygon_region("b", "Dog", DOG)]))
    registry = runtime.get_registry()
    reads, writing = {"get": 0, "all": 0}, threading.local()
    real_get, real_all, real_update = registry.get, registry.all, registry.update

    def get(pid, task_id):
        if not getattr(writing, "on", False):
            reads["get"] += 1
        return real_get(pid, task_id)

    def all_records(pid):
        reads["all"] += 1
        return real_all(pid)

    def update(pid, changes):
        writing.on = True
        try:
            return real_update(pid, changes)
        finally:
            writing.on = False

    monkeypatch.setattr(registry, "get", get)
    monkeypatch.setattr(registry, "all", all_records)
    monkeypatch.setattr(registry, "update", update)
    summary = refresh_project(PID)
    assert summary["rescored"] == 3 and summary["posted"] == 3 and summary["bulk"] is False
    assert reads == {"get": 0, "all": 1}


def test_jobs_queued_by_the_previous_release_still_run(env, ls, engine):
    """An upgrade finds jobs the release before the jobs/ package queued (Redis, the spool) under
    its paths, some with its arguments (the whole task and the XML): they run as today's jobs."""
    from backend.queueing.execution import MOVED_JOBS, import_func, perform
    assert all(callable(import_func(old)) for old in MOVED_JOBS)
    ls.add_task(1, seed=1)
    ann = annotation(11, 1, [polygon_region("a", "Cat", CAT)])
    ls.save_annotation(ann)
    applied = perform("backend.jobs.apply_webhook", [PID, "ANNOTATION_CREATED", {
        "action": "ANNOTATION_CREATED", "annotation": ann, "task": ls.tasks[1],
        "project": {"id": PID, "label_config": LABEL_CONFIG}}], {})
    assert applied["references"] == 1 and applied["changed"]
    task = ls.add_task(2, seed=2)
    old = perform("backend.jobs.predict_task", [PID, task, LABEL_CONFIG], {})
    today = predict(task)
    assert old["result"] and result_hash(old["result"]) == result_hash(today["result"])
    assert old["model_version"] == today["model_version"]
    assert runtime.get_registry().get(PID, 2).image_url == task["data"]["image"]
    assert perform("backend.jobs.warm_task", [PID, task, LABEL_CONFIG], {}) == {"computed": False}  # propose kept it
    expired = perform("backend.jobs.segment_task", [PID, task, LABEL_CONFIG, {}, 0.0], {})
    assert "longer than the /predict budget" in expired["error"]
    assert perform("backend.jobs.refresh_project", [PID], {})["tasks"] == 1
