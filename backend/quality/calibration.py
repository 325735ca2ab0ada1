"""Per-class score thresholds and the variant choice, from leave-one-out evidence (issue 13, items 2, 6).

Inputs are what backend.quality.evaluation measures for one class: the scores of its detections
that matched a ground-truth region at IoU >= 0.5 (true positives) and of those that did not (false
positives), and the number of ground-truth regions (so recall counts the regions no detection
found). A detection is kept when score >= threshold (model.matching's rule), so the candidate
thresholds are the observed scores themselves.

Rules (pure functions; the backend decides when to call them):
* best F1 (default) or, with a target precision, the lowest threshold that reaches it (most recall);
* a calibrated threshold needs evidence: the class appears in at least `min_tasks` annotated tasks
  (default 3), else None and the global SCORE_THRESHOLD applies;
* a control's `model_score_threshold` overrides both (`threshold_in_force`);
* a method variant other than the faithful one is chosen only with at least 5 annotated tasks and
  every class in at least 2, and only when its mean AP is strictly the best.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

MIN_TASKS_FOR_THRESHOLD = 3
MIN_TASKS_FOR_VARIANT = 5
MIN_TASKS_PER_CLASS_FOR_VARIANT = 2
FAITHFUL_VARIANT = "ntt"


@dataclass(frozen=True)
class OperatingPoint:
    """Precision, recall and F1 of the detections with score >= threshold (precision None: none kept)."""

    threshold: float
    precision: float | None
    recall: float
    f1: float

    def to_dict(self) -> dict:
        return {"threshold": self.threshold, "precision": self.precision, "recall": self.recall, "f1": self.f1}


def _sweep(tp_scores: Sequence[float], fp_scores: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(distinct scores descending, TP count kept at each, FP count kept at each)."""
    scores = np.concatenate([np.asarray(tp_scores, np.float64), np.asarray(fp_scores, np.float64)])
    is_tp = np.concatenate([np.ones(len(tp_scores), bool), np.zeros(len(fp_scores), bool)])
    order = np.argsort(-scores, kind="stable")
    scores, is_tp = scores[order], is_tp[order]
    tp, fp = np.cumsum(is_tp), np.cumsum(~is_tp)
    last_of_run = np.r_[scores[1:] != scores[:-1], True] if scores.size else np.zeros(0, bool)
    return scores[last_of_run], tp[last_of_run], fp[last_of_run]


def _point(threshold: float, tp: int, fp: int, n_truth: int) -> OperatingPoint:
    kept = tp + fp
    precision = tp / kept if kept else None
    recall = tp / n_truth if n_truth else 0.0
    f1 = 2 * tp / (n_truth + kept) if n_truth + kept else 0.0   # = 2PR / (P + R)
    return OperatingPoint(float(threshold), precision, recall, f1)


def operating_point(tp_scores: Sequence[float], fp_scores: Sequence[float], n_truth: int,
                    threshold: float) -> OperatingPoint:
    """Precision, recall and F1 when detections with score >= threshold are kept."""
    tp = int(np.sum(np.asarray(tp_scores, np.float64) >= threshold))
    fp = int(np.sum(np.asarray(fp_scores, np.float64) >= threshold))
    return _point(threshold, tp, fp, n_truth)


def best_f1_threshold(tp_scores: Sequence[float], fp_scores: Sequence[float],
                      n_truth: int) -> OperatingPoint | None:
    """The observed score whose threshold gives the highest F1 (the highest such score on a tie);
    None when no threshold finds anything (F1 = 0 everywhere)."""
    scores, tp, fp = _sweep(tp_scores, fp_scores)
    if not scores.size or n_truth <= 0:
        return None
    f1 = 2 * tp / (n_truth + tp + fp)
    best = int(np.argmax(f1))                 # first = highest threshold among equal F1
    return None if f1[best] <= 0 else _point(scores[best], int(tp[best]), int(fp[best]), n_truth)


def target_precision_threshold(tp_scores: Sequence[float], fp_scores: Sequence[float], n_truth: int,
                               target: float) -> OperatingPoint | None:
    """The lowest observed score whose threshold keeps precision >= target (the most recall at that
    precision); None when no threshold reaches it."""
    scores, tp, fp = _sweep(tp_scores, fp_scores)
    ok = np.flatnonzero((tp > 0) & (tp >= target * (tp + fp)))
    if not ok.size or n_truth <= 0:
        return None
    i = int(ok[-1])
    return _point(scores[i], int(tp[i]), int(fp[i]), n_truth)


def calibrate(tp_scores: Sequence[float], fp_scores: Sequence[float], n_truth: int, tasks: int, *,
              min_tasks: int = MIN_TASKS_FOR_THRESHOLD,
              target_precision: float | None = None) -> OperatingPoint | None:
    """A class's calibrated threshold, or None (global default) without enough evidence: fewer than
    `min_tasks` annotated tasks hold the class, or no threshold finds any of its regions."""
    if tasks < min_tasks:
        return None
    if target_precision is None:
        return best_f1_threshold(tp_scores, fp_scores, n_truth)
    return target_precision_threshold(tp_scores, fp_scores, n_truth, target_precision)


def threshold_in_force(default: float, calibrated: float | None = None,
                       control: float | None = None) -> tuple[float, str]:
    """(threshold, source): a control's model_score_threshold, else the calibrated one, else the default."""
    if control is not None:
        return float(control), "control"
    if calibrated is not None:
        return float(calibrated), "calibrated"
    return float(default), "default"


def choose_variant(mean_aps: Mapping[str, float | None], annotated_tasks: int,
                   tasks_per_class: Mapping[str, int], *, faithful: str = FAITHFUL_VARIANT,
                   min_tasks: int = MIN_TASKS_FOR_VARIANT,
                   min_per_class: int = MIN_TASKS_PER_CLASS_FOR_VARIANT) -> tuple[str, str]:
    """(variant name, reason). The faithful method unless the evidence is enough (>= min_tasks
    annotated tasks, every class in >= min_per_class of them) and another variant's mean AP is
    strictly higher than every other's (ties keep the faithful method, then the earlier name)."""
    if annotated_tasks < min_tasks:
        return faithful, f"{annotated_tasks} annotated tasks (< {min_tasks}): the faithful method"
    thin = sorted(c for c, n in tasks_per_class.items() if n < min_per_class)
    if thin or not tasks_per_class:
        return faithful, (f"classes in fewer than {min_per_class} annotated tasks: {', '.join(thin)}"
                          if thin else "no annotated class") + ": the faithful method"
    scored = {name: ap for name, ap in mean_aps.items() if ap is not None}
    if not scored:
        return faithful, "no variant could be scored: the faithful method"
    best = max(scored.values())
    winners = [name for name, ap in scored.items() if ap == best]
    name = faithful if faithful in winners else winners[0]
    return name, f"best mean AP ({best:.3f}) over {len(scored)} variants on {annotated_tasks} tasks"
