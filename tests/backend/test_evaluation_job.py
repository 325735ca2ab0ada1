"""Issue 13 wiring: the evaluation job, the tuning it stores (part of model_version), negatives
from corrections, the /evaluation and /report routes, and the evaluate queue's place.

Same setting as tests/backend/test_jobs.py: the real small engine (random weights), bench's fake
Label Studio over HTTP, Redis under a per-test prefix, enqueue calls recorded (not run).
"""
from __future__ import annotations

import threading
from dataclasses import replace

import pytest

from backend import runtime
from backend.jobs import evaluation as evaluation_job
from backend.jobs.bank import rebuild_bank
from backend.jobs.context import JobContext
from backend.jobs.inference import variant_options
from backend.jobs.webhook import apply_webhook
from backend import queueing
from backend.web.app import create_app
from backend.storage.bank_store import Tuning
from backend.regions.label_config import parse_label_config
from backend.regions.results import detections_to_regions
from backend.settings import Settings
from tests.backend.fixtures import CONFIG_WITH_ATTRS_XML
from tests.backend.test_jobs import (CAT, DOG, LABEL_CONFIG, PID, annotation, engine, env, ls,  # noqa: F401
                                     polygon_region, refresh_calls, webhook)
from tests.backend.test_results import disk, make_detections

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn:DeprecationWarning")

ELSEWHERE = [[60, 5], [95, 5], [95, 40], [60, 40]]   # top right: neither blob


def _evaluations(enqueued) -> list[tuple]:
    return [e for e in enqueued if e[0] == "backend.jobs.evaluation.evaluate_project"]


def _annotated_project(ls, n: int = 3) -> None:
    for tid in range(1, n + 1):
        ls.add_task(tid, seed=tid)
        webhook(ls, "ANNOTATION_CREATED", annotation(10 + tid, tid, [polygon_region("a", "Cat", CAT),
                                                                     polygon_region("b", "Dog", DOG)]))


# ------------------------------------------------------------------------------ tuning
def test_calibrated_thresholds_apply_per_class_and_a_control_threshold_overrides():
    H, W = 48, 64
    det = make_detections([disk(H, W, 12, 24, 5), disk(H, W, 40, 24, 5)], ["Cat", "Dog"], [0.4, 0.4])
    config = parse_label_config(CONFIG_WITH_ATTRS_XML)  # bbox: model_score_threshold 0.6

    def scores(**kw):
        regions = detections_to_regions(det, config, score_threshold=0.5, polygon_tolerance=1.0, **kw)
        return sorted((r["from_name"], r["value"][r["type"]][0]) for r in regions)

    assert scores() == []
    # Cat calibrated at 0.3: its region appears on the controls without their own threshold
    assert scores(class_thresholds={"Cat": 0.3}) == [("brush", "Cat"), ("poly", "Cat")]


def test_tuning_is_part_of_model_version_and_ntt_variant_pins(env, monkeypatch):
    banks = runtime.get_bank_store()
    plain = runtime.model_version(PID)
    assert Tuning().version == "" and plain.endswith("-empty")   # no tuning: the version as before
    assert banks.set_tuning(PID, Tuning("graph", {"Cat": 0.42})) is True
    tuned = runtime.model_version(PID)
    assert tuned != plain and tuned.startswith(plain + "-t")
    assert banks.set_tuning(PID, Tuning("graph", {"Cat": 0.42})) is False  # unchanged
    banks.set_tuning(PID, Tuning("graph", {"Cat": 0.43}))
    assert runtime.model_version(PID) not in (plain, tuned)

    # NTT_VARIANT=ntt: the faithful method whatever the evaluation chose (thresholds still apply)
    runtime.configure(settings=replace(runtime.get_settings(), variant="ntt"))
    assert runtime.get_tuning(PID) == Tuning("ntt", {"Cat": 0.43})
    assert variant_options(JobContext.for_project(PID), "ntt") is None
    assert variant_options(JobContext.for_project(PID), "graph").merge == "graph"
    with pytest.raises(Exception, match="NTT_VARIANT"):
        Settings.from_env({"NTT_VARIANT": "bogus"})


# ------------------------------------------------------------------------------ the job
def test_bank_changes_queue_one_evaluation_on_the_last_queue(env, ls):
    ls.add_task(1, seed=1)
    first = webhook(ls, "ANNOTATION_CREATED", annotation(11, 1, [polygon_region("a", "Cat", CAT)]))
    second = webhook(ls, "ANNOTATION_UPDATED", annotation(11, 1, [polygon_region("a", "Dog", CAT)]))
    assert first["changed"] and second["changed"] and second["evaluation_job"] is None
    (func, args, queue, job_id, _), = _evaluations(env)   # the second change found it still queued
    assert queue == "evaluate" == queueing.QUEUES[-1] and args == (PID,)
    assert job_id == first["evaluation_job"] == f"evaluate-{PID}-{first['version']}"
    assert evaluation_job.status(PID)["status"] == "running"
    # once it starts, the next change queues the next one
    runtime.get_store().delete(f"evaluate-pending:{PID}")
    third = webhook(ls, "ANNOTATION_UPDATED", annotation(11, 1, [polygon_region("a", "Cat", CAT)]))
    assert third["evaluation_job"] == f"evaluate-{PID}-{third['version']}" and len(_evaluations(env)) == 2


def test_evaluation_reports_per_class_figures_and_stores_tuning(env, ls, engine):
    _annotated_project(ls, 3)
    env.clear()
    summary = evaluation_job.evaluate_project(PID)
    assert summary["status"] == "done" and summary["annotated_tasks"] == 3
    result = evaluation_job.status(PID)
    assert result["status"] == "done" and set(result["classes"]) == {"Cat", "Dog"}
    for row in result["classes"].values():
        assert {"ap", "ap50", "precision", "recall", "f1", "threshold", "references", "pr"} <= set(row)
        assert row["references"] == 3
    assert set(result["variants"]) == {"ntt", "graph", "negatives"} and result["curve"]
    assert result["variant_in_use"] == "ntt"   # 3 annotated tasks (< 5): the faithful method
    tuning = runtime.get_bank_store().tuning(PID)
    assert tuning.thresholds == {k: v for k, v in result["thresholds"].items() if v is not None}
    assert bool(refresh_calls(env)) == summary["tuning_changed"]
    assert not runtime.get_store().get(f"evaluate-running:{PID}")


def test_changed_thresholds_change_model_version_and_queue_a_refresh(env, ls, monkeypatch):
    _annotated_project(ls, 1)
    env.clear()
    before = runtime.model_version(PID)
    from backend.quality import evaluation

    real = evaluation.evaluate_project

    def calibrated(*args, **kwargs):
        result = real(*args, **kwargs)
        return {**result, "thresholds": {"Cat": 0.7, "Dog": None}}

    monkeypatch.setattr(evaluation, "evaluate_project", calibrated)
    summary = evaluation_job.evaluate_project(PID)
    assert summary["tuning_changed"] is True and summary["thresholds"] == {"Cat": 0.7}
    after = runtime.model_version(PID)
    assert after != before
    (_, args, queue, job_id, _), = refresh_calls(env)
    assert args == (PID,) and queue == "predict"
    # the refresh re-posts predictions under the new version; the same result again changes nothing
    env.clear()
    assert evaluation_job.evaluate_project(PID)["tuning_changed"] is False and refresh_calls(env) == []
    assert runtime.model_version(PID) == after


def test_pinned_variant_is_the_only_one_evaluated(env, ls):
    _annotated_project(ls, 1)
    runtime.configure(settings=replace(runtime.get_settings(), variant="ntt"))
    evaluation_job.evaluate_project(PID)
    result = evaluation_job.status(PID)
    assert list(result["variants"]) == ["ntt"] and result["variant_reason"] == "pinned by NTT_VARIANT=ntt"


# ------------------------------------------------------------------------------ negatives
def test_a_correction_makes_negatives_and_deleting_it_removes_them(env, ls, engine):
    _annotated_project(ls, 1)
    task = ls.add_task(2, seed=2)
    # our prediction on task 2: Cat on the red blob, Dog on the blue one, Cat on empty background
    predicted = [polygon_region("p1", "Cat", CAT), polygon_region("p2", "Dog", DOG),
                 polygon_region("p3", "Cat", ELSEWHERE)]
    ls.predictions[900] = {"id": 900, "task": task["id"], "result": predicted,
                           "model_version": runtime.model_version(PID)}
    ls.predictions[901] = {"id": 901, "task": task["id"], "result": [polygon_region("x", "Dog", CAT)],
                           "model_version": "someone-else"}   # not ours: never a source of negatives
    # the annotator keeps the Cat, relabels the Dog as Cat, removes the background Cat
    out = webhook(ls, "ANNOTATION_CREATED", annotation(30, 2, [polygon_region("a", "Cat", CAT),
                                                               polygon_region("b", "Cat", DOG)]))
    assert out["negatives"] == 2 and out["changed"] is True
    bank = runtime.get_bank_store().get(PID)
    assert sorted((n.class_name, n.ref_id, n.group) for n in bank.negatives()) == [
        ("Cat", "30:neg:p900:p3", "30"), ("Dog", "30:neg:p900:p2", "30")]
    assert len(bank.refs("Cat")) == 3   # the annotation's references as before

    ls.delete_annotation(30)
    out = apply_webhook(PID, "ANNOTATIONS_DELETED", {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 30}]})
    assert out["changed"] is True
    bank = runtime.get_bank_store().get(PID)
    assert bank.negatives() == [] and len(bank.refs("Cat")) == 1


def test_a_rebuild_keeps_the_negatives_of_annotations_label_studio_still_holds(env, ls, engine):
    """Start training rebuilds the bank from annotations, which cannot recreate negatives: those of
    annotations LS still holds are carried over (same version as before), the others dropped."""
    _annotated_project(ls, 1)
    task = ls.add_task(2, seed=2)
    ls.predictions[900] = {"id": 900, "task": task["id"], "model_version": runtime.model_version(PID),
                           "result": [polygon_region("p1", "Cat", CAT), polygon_region("p3", "Cat", ELSEWHERE)]}
    webhook(ls, "ANNOTATION_CREATED", annotation(30, 2, [polygon_region("a", "Cat", CAT)]))
    before = runtime.get_bank_store().get(PID)
    assert [n.ref_id for n in before.negatives()] == ["30:neg:p900:p3"]

    out = rebuild_bank(PID, refresh=False)
    assert out["changed"] is False   # same references, same negatives: same version
    assert [n.ref_id for n in runtime.get_bank_store().get(PID).negatives()] == ["30:neg:p900:p3"]

    ls.delete_annotation(30)   # gone from LS (its webhook lost): the next rebuild drops its negatives
    rebuild_bank(PID, refresh=False)
    assert runtime.get_bank_store().get(PID).negatives() == []


def test_no_prediction_of_ours_no_negatives(env, ls):
    _annotated_project(ls, 1)
    ls.add_task(2, seed=2)
    out = webhook(ls, "ANNOTATION_CREATED", annotation(30, 2, []))
    assert out["negatives"] == 0 and runtime.get_bank_store().get(PID).negatives() == []


# ------------------------------------------------------------------------------ routes
def test_evaluation_and_report_routes(env, ls):
    client = create_app().test_client()
    assert client.get("/evaluation").status_code == 400
    assert client.get(f"/evaluation?project={PID}").status_code == 404   # never set up
    runtime.get_bank_store().set_label_config(PID, LABEL_CONFIG)
    assert client.get(f"/evaluation?project={PID}").status_code == 404   # no evaluation yet
    assert client.get(f"/report?project={PID}").status_code == 404
    resp = client.post(f"/evaluation?project={PID}")
    assert resp.status_code == 202 and resp.json["status"] == "queued"
    assert client.post(f"/evaluation?project={PID}").json["status"] == "already queued"
    assert client.get(f"/evaluation?project={PID}").json["status"] == "running"
    (_, _, queue, job_id, _), = _evaluations(env)
    assert queue == "evaluate" and resp.json["job"] == job_id

    _annotated_project(ls, 2)
    evaluation_job.evaluate_project(PID)
    body = client.get(f"/evaluation?project={PID}").json
    assert body["status"] == "done" and set(body["classes"]) == {"Cat", "Dog"}
    page = client.get(f"/report?project={PID}")
    assert page.status_code == 200 and page.mimetype == "text/html"
    assert "<svg" in page.text and "Cat" in page.text
    thumbs = evaluation_job.thumbnails(PID)
    assert {m["task_id"] for m in body["misses"]} == set(thumbs)
    assert all(t.startswith(b"\xff\xd8") for t in thumbs.values())   # JPEG


# ------------------------------------------------------------------------------ queue order
ORDER: list[str] = []
GATE, END = threading.Event(), threading.Event()


def hold() -> None:
    GATE.wait(30)
    ORDER.append("bank")


def record(name: str) -> None:
    ORDER.append(name)
    if name == "end":
        END.set()


def test_an_evaluation_never_runs_before_a_waiting_prediction():
    backend = queueing.EmbeddedBackend()
    ORDER.clear()
    GATE.clear()
    END.clear()
    backend.enqueue(f"{__name__}.hold", (), {}, "bank", "j0", None, 0, None)   # the worker is busy
    backend.enqueue(f"{__name__}.record", ("evaluate",), {}, "evaluate", "j1", None, 0, None)
    backend.enqueue(f"{__name__}.record", ("predict",), {}, "predict", "j2", None, 0, None)
    backend.enqueue(f"{__name__}.record", ("end",), {}, "evaluate", "j3", None, 0, None)
    GATE.set()
    assert END.wait(30)
    assert ORDER == ["bank", "predict", "evaluate", "end"]
