"""COCOeval of one set of detections against the ground truth: per-class AP and COCOeval's own
true/false-positive matches at IoU 0.5."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from backend.quality.truth import Found, Truth, quiet


@dataclass
class ClassScore:
    box_ap: float | None = None
    box_ap50: float | None = None
    mask_ap: float | None = None
    mask_ap50: float | None = None
    pr50: list[float] = field(default_factory=list)        # precision at 101 recall points, IoU 0.5
    tp_scores: list[float] = field(default_factory=list)
    fp_scores: list[float] = field(default_factory=list)
    n_truth: int = 0
    false: list[tuple[int, int, float]] = field(default_factory=list)        # (task, det, score)
    matched: list[tuple[int, int, float | None]] = field(default_factory=list)  # (task, region, score)

    @property
    def ap(self) -> float | None:
        """The class's own AP: mask AP for mask classes, box AP otherwise (set by Scored)."""
        return self.mask_ap if self.mask_ap is not None else self.box_ap


class Scored:
    """Per-class COCOeval results of one set of detections over the tasks they cover."""

    def __init__(self, truth: Truth, found: Mapping[int, Found]) -> None:
        self.truth, self.found = truth, found
        self.image_ids = sorted(i + 1 for i in found)
        present = {truth.tasks[i].truth[j].label for i in found for j in range(len(truth.tasks[i].truth))}
        self.classes: dict[str, ClassScore] = {label: ClassScore() for label in truth.labels if label in present}
        for iou_type, coco_gt in truth.coco.items():
            self._evaluate(iou_type, coco_gt)

    def mean_ap(self) -> float | None:
        aps = [c.ap for c in self.classes.values() if c.ap is not None]
        return float(np.mean(aps)) if aps else None

    def _results(self, iou_type: str) -> tuple[list[dict], list[tuple[int, int]]]:
        results, origin = [], []
        for i in sorted(self.found):
            f = self.found[i]
            for d, label in enumerate(f.labels):
                if label not in self.truth.cat_ids or (iou_type == "segm" and label not in self.truth.mask_classes):
                    continue
                r = {"image_id": i + 1, "category_id": self.truth.cat_ids[label], "score": f.scores[d]}
                r.update({"bbox": f.boxes[d]} if iou_type == "bbox" else {"segmentation": f.rles[d]})
                results.append(r)
                origin.append((i, d))
        return results, origin

    def _evaluate(self, iou_type: str, coco_gt: COCO) -> None:
        # in category id order (= sorted labels): COCOeval sorts catIds, precision[..., k, ...] follows
        labels = [c for c in self.classes if (iou_type == "bbox" or c in self.truth.mask_classes)]
        if not labels:
            return
        results, origin = self._results(iou_type)
        ev = None
        if results:
            with quiet():
                ev = COCOeval(coco_gt, coco_gt.loadRes(results), iou_type)
                ev.params.imgIds = self.image_ids
                ev.params.catIds = [self.truth.cat_ids[c] for c in labels]
                ev.evaluate()
                ev.accumulate()
        for k, label in enumerate(labels):
            c = self.classes[label]
            ap, ap50, pr50 = class_ap(ev, k)
            if iou_type == "bbox":
                c.box_ap, c.box_ap50 = ap, ap50
            else:
                c.mask_ap, c.mask_ap50 = ap, ap50
            if iou_type == self.truth.iou_type(label):
                c.pr50 = pr50
                self._matches(ev, label, c, origin)

    def _matches(self, ev: COCOeval | None, label: str, c: ClassScore, origin: list[tuple[int, int]]) -> None:
        """True/false positives at IoU 0.5 from COCOeval's own greedy matching (evalImgs)."""
        cat = self.truth.cat_ids[label]
        if ev is None:   # no detections at all: every region is missed
            for i in self.found:
                for j, region in enumerate(self.truth.tasks[i].truth):
                    if region.label == label:
                        c.n_truth += 1
                        c.matched.append((i, j, None))
            return
        all_range = ev.params.areaRng[0]
        for e in ev.evalImgs:
            if e is None or e["category_id"] != cat or e["aRng"] != all_range:
                continue
            for dt_id, score, gt_id, ignore in zip(e["dtIds"], e["dtScores"], e["dtMatches"][0], e["dtIgnore"][0]):
                if ignore:
                    continue
                (c.tp_scores if gt_id else c.fp_scores).append(float(score))
                if not gt_id:
                    c.false.append((*origin[int(dt_id) - 1], float(score)))
            scores = dict(zip(e["dtIds"], e["dtScores"]))
            for gt_id, dt_id, ignore in zip(e["gtIds"], e["gtMatches"][0], e["gtIgnore"]):
                if ignore:
                    continue
                c.n_truth += 1
                c.matched.append((*self.truth.origin[int(gt_id)], float(scores[int(dt_id)]) if dt_id else None))


def class_ap(ev: COCOeval | None, k: int) -> tuple[float | None, float | None, list[float]]:
    """(AP over IoU .50:.95, AP50, precision at IoU .5 per recall point) of category index k, as
    COCOeval.summarize averages them (all areas, 100 detections per image)."""
    if ev is None:
        return 0.0, 0.0, [0.0] * 101
    precision = ev.eval["precision"][:, :, k, 0, -1]          # [IoU thresholds, recall points]
    valid = precision[precision > -1]
    if not valid.size:
        return None, None, []
    p50 = precision[0]
    return float(valid.mean()), float(p50[p50 > -1].mean()), [round(float(max(v, 0.0)), 4) for v in p50]


