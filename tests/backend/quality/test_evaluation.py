"""Leave-one-task-out evaluation (backend.quality.evaluation) against a recording fake matcher and
pycocotools' COCOeval run directly on the same detections."""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from backend.quality.evaluation import (AnnotatedTask, EvaluationSettings, TruthRegion, bank_subset,
                                        evaluate_project)
from model.types import Detections
from tests.backend.quality.fakes import SIZE, detections, project_bank, random_project, rect_mask


def _groups(bank) -> frozenset[str]:
    return frozenset(r.group for c in bank.classes for r in bank.refs(c))


class Recorder:
    """match(task_id, bank, options) returning fixed detections and recording what the bank held."""

    def __init__(self, found: dict) -> None:
        self.found, self.calls = found, []

    def __call__(self, task_id, bank, options) -> Detections:
        self.calls.append((task_id, _groups(bank), options))
        found = self.found[task_id]
        return found(bank, options) if callable(found) else found


def test_leave_one_out_never_lets_a_task_score_itself():
    tasks, found = random_project(6)
    bank = project_bank(tasks)
    rec = Recorder(found)
    result = evaluate_project(tasks, bank, rec, {"ntt": None, "graph": "graph-options"})
    own = {t.task_id: t.groups for t in tasks}
    every = frozenset().union(*own.values())
    assert rec.calls and all(not (groups & own[task_id]) for task_id, groups, _ in rec.calls)
    for task in tasks:      # each task was scored once per variant by all the other tasks' references
        for options in (None, "graph-options"):
            assert (task.task_id, every - task.groups, options) in rec.calls
    assert result["cost"]["matches"] == len(rec.calls)
    assert len(bank) == sum(len(t.truth) for t in tasks)        # the project's bank is untouched


def test_bank_subset_drops_or_keeps_groups_without_touching_the_bank():
    tasks, _ = random_project(3)
    bank = project_bank(tasks)
    before = bank.version
    assert _groups(bank_subset(bank, drop={"ann1"})) == {"ann0", "ann2"}
    assert _groups(bank_subset(bank, keep={"ann1"})) == {"ann1"}
    assert bank.version == before


def test_bank_subset_carries_negatives_by_group_too():
    """A fold bank keeps the other tasks' negatives (the "negatives" variant needs them) and never
    the held-out task's own."""
    tasks, _ = random_project(3)
    bank = project_bank(tasks)
    for n in range(3):
        bank.add_negative("a", f"ann{n}:neg:0", np.ones(bank.dim, np.float32), group=f"ann{n}")
    assert [r.group for r in bank_subset(bank, drop={"ann1"}).negatives()] == ["ann0", "ann2"]
    assert [r.group for r in bank_subset(bank, keep={"ann1"}).negatives()] == ["ann1"]


def _direct_cocoeval(tasks, found) -> dict[tuple[str, str], tuple[float, float]]:
    """(label, iou type) -> (AP, AP50) from COCOeval on one category at a time, built here from the
    full masks (Detections.mask) rather than by the module under test."""
    labels = sorted({r.label for t in tasks for r in t.truth})
    cats = {label: k + 1 for k, label in enumerate(labels)}
    images = [{"id": i + 1, "height": t.image_size[0], "width": t.image_size[1]} for i, t in enumerate(tasks)]
    out = {}
    for iou_type in ("bbox", "segm"):
        anns, results = [], []
        for i, t in enumerate(tasks):
            for r in t.truth:
                if iou_type == "segm" and r.label != "cat":
                    continue
                x0, y0, x1, y1 = r.box
                ann = {"id": len(anns) + 1, "image_id": i + 1, "category_id": cats[r.label], "iscrowd": 0,
                       "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0)}
                if iou_type == "segm":
                    ann["segmentation"] = mask_utils.encode(np.asfortranarray(r.mask.astype(np.uint8)))
                    ann["area"] = float(r.mask.sum())
                anns.append(ann)
            det = found[t.task_id]
            for d, label in enumerate(det.labels):
                if iou_type == "segm" and label != "cat":
                    continue
                bx0, by0, bx1, by1 = (float(v) for v in det.boxes[d])
                res = {"image_id": i + 1, "category_id": cats[label], "score": float(det.scores[d])}
                if iou_type == "bbox":
                    res["bbox"] = [bx0, by0, bx1 - bx0 + 1, by1 - by0 + 1]
                else:
                    res["segmentation"] = mask_utils.encode(np.asfortranarray(det.mask(d).astype(np.uint8)))
                results.append(res)
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO()
            gt.dataset = {"images": images, "annotations": anns,
                          "categories": [{"id": k, "name": n} for n, k in cats.items()]}
            gt.createIndex()
            for label in (labels if iou_type == "bbox" else ["cat"]):
                ev = COCOeval(gt, gt.loadRes([dict(r) for r in results]), iou_type)
                ev.params.catIds = [cats[label]]
                ev.evaluate()
                ev.accumulate()
                ev.summarize()
                out[(label, iou_type)] = (float(ev.stats[0]), float(ev.stats[1]))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ap_equals_cocoeval_on_the_same_detections(seed):
    tasks, found = random_project(10, seed=seed)
    result = evaluate_project(tasks, project_bank(tasks), Recorder(found))
    direct = _direct_cocoeval(tasks, found)
    classes = result["classes"]
    assert set(classes) == {"cat", "box"}
    assert (classes["cat"]["ap"], classes["cat"]["ap50"]) == pytest.approx(direct[("cat", "bbox")], abs=1e-12)
    assert (classes["cat"]["mask_ap"], classes["cat"]["mask_ap50"]) == pytest.approx(direct[("cat", "segm")], abs=1e-12)
    assert (classes["box"]["ap"], classes["box"]["ap50"]) == pytest.approx(direct[("box", "bbox")], abs=1e-12)
    assert classes["box"]["mask_ap"] is None and classes["box"]["iou_type"] == "bbox"
    assert classes["cat"]["iou_type"] == "segm"
    # mean AP: mask AP for the mask class, box AP for the box class
    assert result["variants"]["ntt"]["mean_ap"] == pytest.approx(
        (direct[("cat", "segm")][0] + direct[("box", "bbox")][0]) / 2, abs=1e-12)
    assert all(0.0 <= classes[c]["ap"] <= 1.0 for c in classes)
    json.dumps(result)      # JSON-able as it is


def _tiny_bank(task: AnnotatedTask):
    """The task's own references plus one of another annotation (its fold bank is not empty)."""
    bank = project_bank([task])
    bank.add("cat", "other:0", np.ones(bank.dim, np.float32), "other")
    return bank


def _tiny_task(labels=("cat", "cat")) -> tuple[AnnotatedTask, Detections]:
    """2 regions, 3 detections: 0.9 on region 1 (exact), 0.8 on nothing, 0.7 on region 2 (exact)."""
    a, b, c = rect_mask(2, 2, 12, 10), rect_mask(30, 20, 44, 34), rect_mask(20, 2, 28, 8)
    task = AnnotatedTask(7, SIZE, (TruthRegion(labels[0], mask=a), TruthRegion(labels[1], mask=b)),
                         frozenset({"a7"}))
    return task, detections([("cat", 0.9, a), ("cat", 0.8, c), ("cat", 0.7, b)])


def test_tiny_case_has_the_hand_computed_ap_and_threshold():
    # Precision/recall after each detection: (1, 1/2), (1/2, 1/2), (2/3, 1). COCO's interpolated
    # precision is 1 at the 51 recall points 0..0.50 and 2/3 at the 50 points 0.51..1, at every
    # IoU threshold (the hits are exact): AP = AP50 = (51 + 50 * 2/3) / 101 = 253/303.
    task, det = _tiny_task()
    settings = EvaluationSettings(min_tasks_for_threshold=1)
    result = evaluate_project([task], _tiny_bank(task), Recorder({7: det}), settings=settings)
    cat = result["classes"]["cat"]
    for key in ("ap", "ap50", "mask_ap", "mask_ap50"):
        assert cat[key] == pytest.approx(253 / 303, abs=1e-12), key
    # F1 at 0.9: 2/3, at 0.8: 1/2, at 0.7: 4/5 -> calibrated threshold 0.7 (P 2/3, R 1)
    assert cat["calibrated_threshold"] == pytest.approx(0.7) and cat["threshold_source"] == "calibrated"
    assert (cat["precision"], cat["recall"], cat["f1"]) == pytest.approx((2 / 3, 1.0, 0.8))
    assert cat["instances"] == 2 and cat["tasks"] == 1 and cat["references"] == 3
    assert result["thresholds"] == {"cat": pytest.approx(0.7)}
    hist = cat["histogram"]            # 20 bins of 0.05; float32 0.9 and 0.7 are a hair below
    assert len(hist["edges"]) == 21 and hist["tp"][17] == hist["tp"][13] == hist["fp"][16] == 1
    assert sum(hist["tp"]) == 2 and sum(hist["fp"]) == 1
    assert cat["pr"]["precision"][:51] == [1.0] * 51 and cat["pr"]["precision"][51:] == [0.6667] * 50
    # one task: no evidence for a threshold under the default rule (>= 3 tasks)
    default = evaluate_project([task], _tiny_bank(task), Recorder({7: det}),
                               settings=EvaluationSettings(default_threshold=0.75))
    cat = default["classes"]["cat"]
    assert cat["calibrated_threshold"] is None and (cat["threshold"], cat["threshold_source"]) == (0.75, "default")
    assert (cat["precision"], cat["recall"]) == pytest.approx((1 / 2, 1 / 2))   # 0.9 and 0.8 kept
    control = evaluate_project([task], _tiny_bank(task), Recorder({7: det}),
                               settings=EvaluationSettings(control_thresholds={"cat": 0.95}))
    cat = control["classes"]["cat"]
    assert (cat["threshold_source"], cat["precision"], cat["recall"], cat["f1"]) == ("control", None, 0.0, 0.0)


def test_confusion_and_worst_misses_at_the_thresholds_in_force():
    a, b, far = rect_mask(2, 2, 12, 10), rect_mask(30, 20, 44, 34), rect_mask(48, 2, 58, 10)
    task = AnnotatedTask("t1", SIZE, (TruthRegion("cat", mask=a), TruthRegion("box", box=(30.0, 20.0, 44.0, 34.0))),
                         frozenset({"g1"}))
    det = detections([("box", 0.9, a),        # labelled box on the cat: false, confused with cat
                      ("cat", 0.6, far),      # on nothing: false, background
                      ("cat", 0.3, a)])       # on the cat but below the threshold 0.5: cat missed
    result = evaluate_project([task], _tiny_bank(task), Recorder({"t1": det}))
    conf = result["confusion"]
    assert conf["labels"] == ["box", "cat"]
    assert conf["matrix"] == [[0, 1], [0, 0]] and conf["background"] == [0, 1]
    misses = result["misses"]
    assert [(m["kind"], m["label"], m["score"], m["overlaps"] if m["kind"] == "false" else None) for m in misses] == [
        ("false", "box", pytest.approx(0.9), "cat"), ("false", "cat", pytest.approx(0.6), None),
        ("missed", "box", None, None), ("missed", "cat", pytest.approx(0.3), None)]    # larger region first
    assert misses[0]["task_id"] == "t1" and misses[0]["box"] == [2.0, 2.0, 12.0, 10.0]
    assert misses[2]["box"] == [30.0, 20.0, 44.0, 34.0] and misses[2]["image_size"] == list(SIZE)
    small = evaluate_project([task], _tiny_bank(task), Recorder({"t1": det}),
                             settings=EvaluationSettings(gallery_size=2))
    assert [m["kind"] for m in small["misses"]] == ["false", "missed"]


def _two_class_project(n: int) -> tuple[list[AnnotatedTask], dict]:
    """Tasks alternating a 'cat' and a 'dog' region; the matcher finds a region exactly when the
    bank holds its class, else it reports a false blob."""
    tasks, found = [], {}
    for t in range(n):
        label = "cat" if t % 2 == 0 else "dog"
        region = rect_mask(5 + t, 5, 20 + t, 15)
        tasks.append(AnnotatedTask(t, SIZE, (TruthRegion(label, mask=region),), frozenset({f"g{t}"})))

        def found_for(bank, options, label=label, region=region):
            hit = label in bank.classes and options != "blind"
            return detections([(label, 0.9, region)] if hit else [(label, 0.4, rect_mask(40, 25, 50, 35))])
        found[t] = found_for
    return tasks, found


def test_learning_curve_banks_hold_k_tasks_and_score_only_held_out_ones():
    tasks, found = _two_class_project(6)
    rec = Recorder(found)
    settings = EvaluationSettings(curve_repeats=3, curve_max_eval_tasks=2)
    result = evaluate_project(tasks, project_bank(tasks), rec, settings=settings)
    curve = result["curve"]
    assert [p["tasks"] for p in curve] == [1, 2, 4, 5]
    assert [p["runs"] for p in curve] == [3, 3, 3, 6]
    loo_calls, curve_calls = rec.calls[:6], rec.calls[6:]
    assert len(curve_calls) == 3 * 3 * 2 == result["cost"]["matches"] - 6
    for k in (1, 2, 4):
        calls = [c for c in curve_calls if len(c[1]) == k]
        assert len(calls) == 3 * 2
    assert all(f"g{task_id}" not in groups for task_id, groups, _ in rec.calls)
    assert curve[-1]["mean_ap"] == result["variants"]["ntt"]["mean_ap"] == pytest.approx(1.0)
    one = curve[0]   # a one-task bank has one class: the other class's held-out tasks score 0
    assert one["mean_ap"] < 1.0 and one["min"] <= one["mean_ap"] <= one["max"]
    assert len(loo_calls) == 6


def test_variants_are_scored_side_by_side_and_the_best_is_used_with_evidence():
    tasks, found = _two_class_project(6)
    variants = {"ntt": "blind", "graph": None}      # options are passed to the matcher as they are
    result = evaluate_project(tasks, project_bank(tasks), Recorder(found), variants)
    assert result["variants"]["ntt"]["mean_ap"] == 0.0 and result["variants"]["graph"]["mean_ap"] == pytest.approx(1.0)
    assert result["variant_in_use"] == "graph"
    assert result["classes"]["cat"]["ap"] == pytest.approx(1.0)
    thin = evaluate_project(tasks[:4], project_bank(tasks[:4]), Recorder(found), variants)   # < 5 tasks
    assert thin["variant_in_use"] == "ntt" and "4 annotated tasks" in thin["variant_reason"]
    assert thin["variants"]["graph"]["mean_ap"] == pytest.approx(1.0)


def test_an_empty_fold_bank_finds_nothing_without_asking_the_matcher():
    task, det = _tiny_task()
    rec = Recorder({7: det})
    result = evaluate_project([task], project_bank([task]), rec)     # its only references are its own
    assert rec.calls == [] and result["classes"]["cat"]["ap"] == 0.0 and result["classes"]["cat"]["recall"] == 0.0
    assert result["curve"] == [] and [m["kind"] for m in result["misses"]] == ["missed", "missed"]


def test_bad_input_gets_a_clear_error():
    task, det = _tiny_task()
    bank = _tiny_bank(task)
    with pytest.raises(ValueError, match="unique"):
        evaluate_project([task, task], bank, Recorder({7: det}))
    with pytest.raises(ValueError, match="faithful"):
        evaluate_project([task], bank, Recorder({7: det}), {"graph": None})
    with pytest.raises(ValueError, match="size"):
        evaluate_project([task], bank, Recorder({7: detections([("cat", 0.5, rect_mask(0, 0, 4, 4, (20, 20)))],
                                                               (20, 20))}))
    with pytest.raises(ValueError, match="shape"):
        evaluate_project([AnnotatedTask(1, SIZE, (TruthRegion("cat", mask=np.ones((3, 3), bool)),), frozenset())],
                         bank, Recorder({1: det}))
    with pytest.raises(ValueError, match="neither"):
        TruthRegion("cat")
