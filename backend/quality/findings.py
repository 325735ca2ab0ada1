"""What an evaluation reports per class and overall: the class table (AP, threshold in force,
P/R/F1), PR curves and score histograms, the confusion counts and the gallery of worst misses."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import numpy as np
from pycocotools import mask as mask_utils

from backend.quality import calibration
from backend.quality.scoring import Scored
from backend.quality.truth import Found, Truth, xywh
from model.bank import MemoryBank

if TYPE_CHECKING:
    from backend.quality.evaluation import EvaluationSettings

MATCH_IOU = 0.5          # COCOeval's first IoU threshold: true/false positives, confusion, thresholds
BACKGROUND = None        # confusion: a detection overlapping no ground truth at MATCH_IOU


# ------------------------------------------------------------------------------ class tables
def class_table(scored: Scored, bank: MemoryBank, settings: "EvaluationSettings") -> dict[str, dict]:
    """Per class: AP figures, the calibrated threshold and precision/recall/F1 at the one in force."""
    truth, out = scored.truth, {}
    for label, c in scored.classes.items():
        point = calibration.calibrate(c.tp_scores, c.fp_scores, c.n_truth, truth.tasks_per_class[label],
                                      min_tasks=settings.min_tasks_for_threshold,
                                      target_precision=settings.target_precision)
        threshold, source = calibration.threshold_in_force(
            settings.default_threshold, None if point is None else point.threshold,
            settings.control_thresholds.get(label))
        at = calibration.operating_point(c.tp_scores, c.fp_scores, c.n_truth, threshold)
        out[label] = {
            "ap": c.box_ap, "ap50": c.box_ap50, "mask_ap": c.mask_ap, "mask_ap50": c.mask_ap50,
            "iou_type": truth.iou_type(label), "precision": at.precision, "recall": at.recall, "f1": at.f1,
            "threshold": threshold, "threshold_source": source,
            "calibrated_threshold": None if point is None else point.threshold,
            "references": len(bank.refs(label)), "tasks": truth.tasks_per_class[label],
            "instances": c.n_truth}
    return out


def details(scored: Scored, bins: int) -> dict[str, dict]:
    """PR curve at IoU 0.5 and TP/FP score histograms per class (for the report)."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    return {label: {"pr": {"recall": [round(r, 2) for r in np.linspace(0, 1, 101)] if c.pr50 else [],
                           "precision": c.pr50},
                    "histogram": {"edges": [round(float(e), 4) for e in edges],
                                  "tp": np.histogram(np.clip(c.tp_scores, 0, 1), edges)[0].tolist(),
                                  "fp": np.histogram(np.clip(c.fp_scores, 0, 1), edges)[0].tolist()}}
            for label, c in scored.classes.items()}


def thresholds(classes: Mapping[str, dict], settings: "EvaluationSettings") -> Callable[[str], float]:
    def of(label: str) -> float:
        if label in classes:
            return classes[label]["threshold"]
        return calibration.threshold_in_force(settings.default_threshold, None,
                                              settings.control_thresholds.get(label))[0]
    return of


def confusion(truth: Truth, found: Mapping[int, Found], threshold: Callable[[str], float]
               ) -> tuple[dict, dict[tuple[int, int], str | None]]:
    """Kept detections (score >= their class's threshold) by predicted label and the label of the
    ground truth they overlap most at IoU >= 0.5 (mask IoU for mask classes, box IoU otherwise)."""
    counts: dict[tuple[str, str | None], int] = {}
    overlaps: dict[tuple[int, int], str | None] = {}
    for i, f in found.items():
        regions = truth.tasks[i].truth
        kept = [d for d, (label, s) in enumerate(zip(f.labels, f.scores)) if s >= threshold(label)]
        if not kept:
            continue
        iou = np.zeros((len(kept), len(regions)))
        if regions:
            box_iou = np.asarray(mask_utils.iou([f.boxes[d] for d in kept], [xywh(r.box) for r in regions],
                                                [0] * len(regions))).reshape(len(kept), len(regions))
            iou[:] = box_iou
            seg = [j for j, r in enumerate(regions) if r.label in truth.mask_classes]
            if seg:
                iou[:, seg] = np.asarray(mask_utils.iou([f.rles[d] for d in kept],
                                                        [truth.gt_rles[i][j] for j in seg],
                                                        [0] * len(seg))).reshape(len(kept), len(seg))
        for row, d in enumerate(kept):
            best = int(np.argmax(iou[row])) if regions else -1
            true = regions[best].label if regions and iou[row, best] >= MATCH_IOU else BACKGROUND
            overlaps[(i, d)] = true
            counts[(f.labels[d], true)] = counts.get((f.labels[d], true), 0) + 1
    predicted = sorted({p for p, _ in counts})
    labels = sorted(set(truth.labels) | set(predicted))
    return {"labels": labels,
            "matrix": [[counts.get((p, t), 0) for t in labels] for p in labels],
            "background": [counts.get((p, BACKGROUND), 0) for p in labels]}, overlaps


def misses(scored: Scored, classes: Mapping[str, dict], overlaps: Mapping[tuple[int, int], str | None],
            size: int) -> list[dict]:
    """The worst errors at the thresholds in force: the highest-scoring false regions and the
    largest missed regions, half each (the other kind fills a short half)."""
    truth, found = scored.truth, scored.found
    false, missed = [], []
    for label, c in scored.classes.items():
        t = classes[label]["threshold"]
        for i, d, s in c.false:
            if s >= t:
                x, y, w, h = found[i].boxes[d]
                false.append({"task_id": truth.tasks[i].task_id, "kind": "false", "label": label, "score": s,
                              "box": [x, y, x + w, y + h], "overlaps": overlaps.get((i, d)),
                              "image_size": list(truth.tasks[i].image_size)})
        for i, j, s in c.matched:
            if s is None or s < t:
                region = truth.tasks[i].truth[j]
                missed.append({"task_id": truth.tasks[i].task_id, "kind": "missed", "label": label, "score": s,
                               "box": list(region.box), "image_size": list(truth.tasks[i].image_size),
                               "area": (region.box[2] - region.box[0]) * (region.box[3] - region.box[1])})
    false.sort(key=lambda m: -m["score"])
    missed.sort(key=lambda m: -m["area"])
    n_false = min(len(false), max(size // 2, size - len(missed)))
    return false[:n_false] + missed[:size - n_false]

