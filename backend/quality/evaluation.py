"""Leave-one-task-out evaluation of the method on a project's own annotations (issue 13, items 1, 6).

For every annotated task, the memory bank without that task's references (its annotations' bank
groups) scores the task's proposals through an injected `match(task_id, bank, options)`; the
detections of all folds are then compared with the tasks' annotations by pycocotools' COCOeval,
per class (= COCO category): box AP and AP50 always, mask AP and AP50 for classes whose ground
truth is all masks (brush, polygon). True/false positives are COCOeval's own matches at IoU 0.5
(mask IoU for mask classes, box IoU otherwise), which feed the calibrated thresholds
(backend.quality.calibration), the score histograms, the confusion counts and the gallery of worst
misses. Every named variant (name -> options passed to `match` as they are) is scored on the same
split; a learning curve re-scores held-out tasks with banks built from 1, 2, 4, ... annotated tasks.

Nothing here reads Redis, Label Studio or the models: the caller passes the tasks' ground truth,
the project's bank and the matcher (the backend's one matches cached proposals), and gets one
JSON-able dict (see `evaluate_project`).

The data (ground truth, detections) are in backend.quality.truth, the COCOeval scoring in
backend.quality.scoring and the per-class findings in backend.quality.findings.
"""
from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from backend.quality import calibration
from backend.quality import findings
from backend.quality.scoring import Scored
from backend.quality.truth import AnnotatedTask, Found, TaskId, Truth, TruthRegion
from model.bank import MemoryBank
from model.types import Detections

Matcher = Callable[[TaskId, MemoryBank, Any], Detections]
__all__ = ["AnnotatedTask", "EvaluationSettings", "Matcher", "TruthRegion", "bank_subset", "evaluate_project"]


@dataclass(frozen=True)
class EvaluationSettings:
    """default_threshold: SCORE_THRESHOLD; control_thresholds: label -> a control's
    model_score_threshold; the rest: see backend.quality.calibration and the learning curve."""

    default_threshold: float = 0.5
    control_thresholds: Mapping[str, float] = field(default_factory=dict)
    min_tasks_for_threshold: int = calibration.MIN_TASKS_FOR_THRESHOLD
    target_precision: float | None = None
    min_tasks_for_variant: int = calibration.MIN_TASKS_FOR_VARIANT
    min_tasks_per_class_for_variant: int = calibration.MIN_TASKS_PER_CLASS_FOR_VARIANT
    faithful: str = calibration.FAITHFUL_VARIANT
    curve_repeats: int = 3            # random subsets per learning-curve size
    curve_max_eval_tasks: int = 50    # held-out tasks scored per subset (a seeded sample beyond)
    seed: int = 0
    gallery_size: int = 12
    histogram_bins: int = 20



def bank_subset(bank: MemoryBank, *, drop: Iterable[str] = (), keep: Iterable[str] | None = None) -> MemoryBank:
    """A new bank with the references and negatives of `bank` whose group is not in `drop` (and,
    given `keep`, is in `keep`: ungrouped entries are then left out too). `bank` is not changed."""
    drop, keep = set(drop), None if keep is None else set(keep)
    out = MemoryBank(bank.dim)
    def kept(entry) -> bool:  # noqa: ANN001 - a model.bank.Reference
        return entry.group not in drop and (keep is None or entry.group in keep)

    for ref in (r for name in bank.classes for r in bank.refs(name) if kept(r)):
        out.add(ref.class_name, ref.ref_id, ref.descriptor, ref.group)
    for neg in filter(kept, bank.negatives()):
        out.add_negative(neg.class_name, neg.ref_id, neg.descriptor, neg.group)
    return out


def _detect(match: Matcher, task: AnnotatedTask, bank: MemoryBank, options: Any) -> Found:
    """The task's detections by `bank`; an empty bank (a one-task project's fold) finds nothing
    without asking the matcher."""
    det = match(task.task_id, bank, options) if len(bank) else Detections.empty(task.image_size)
    return Found.of(det, task.image_size)



# ------------------------------------------------------------------------------ orchestration
def _curve_sizes(n: int) -> list[int]:
    """1, 2, 4, ... below n - 1 (n - 1, all but one, is the leave-one-out result itself)."""
    sizes, k = [], 1
    while k < n - 1:
        sizes.append(k)
        k *= 2
    return sizes


def _learning_curve(truth: Truth, bank: MemoryBank, match: Matcher, options: Any, loo: Scored,
                    settings: EvaluationSettings, map_fn: Callable) -> tuple[list[dict], int]:
    """Mean AP of held-out tasks when the bank holds only the references of k random annotated
    tasks, k = 1, 2, 4, ...; the last point is leave-one-out (all tasks but the scored one)."""
    rng, tasks = random.Random(settings.seed), truth.tasks
    n, points, matches = len(tasks), [], 0
    for k in _curve_sizes(n):
        aps = []
        for _ in range(settings.curve_repeats):
            chosen = set(rng.sample(range(n), k))
            held = [i for i in range(n) if i not in chosen]
            if len(held) > settings.curve_max_eval_tasks:
                held = sorted(rng.sample(held, settings.curve_max_eval_tasks))
            sub = bank_subset(bank, keep={g for i in chosen for g in tasks[i].groups})
            dets = list(map_fn(lambda i: _detect(match, tasks[i], sub, options), held))
            matches += len(held)
            ap = Scored(truth, dict(zip(held, dets))).mean_ap()
            if ap is not None:
                aps.append(ap)
        if aps:
            points.append({"tasks": k, "mean_ap": float(np.mean(aps)), "std": float(np.std(aps)),
                           "min": float(min(aps)), "max": float(max(aps)), "runs": len(aps)})
    if n >= 2 and loo.mean_ap() is not None:
        ap = loo.mean_ap()
        points.append({"tasks": n - 1, "mean_ap": ap, "std": 0.0, "min": ap, "max": ap, "runs": n})
    return points, matches


def evaluate_project(tasks: Sequence[AnnotatedTask], bank: MemoryBank, match: Matcher,
                     variants: Mapping[str, Any] | None = None,
                     settings: EvaluationSettings = EvaluationSettings(),
                     map_fn: Callable[[Callable, Iterable], Iterable] = map) -> dict:
    """Leave-one-task-out evaluation of every variant, the variant choice, thresholds, learning
    curve, confusion and worst misses, as one JSON-able dict.

    match(task_id, bank, options) -> Detections of that task's image, every detection kept (no
    score threshold), `options` being the variant's value (None: the method as configured).
    `map_fn` may run the per-task work in parallel (e.g. a thread pool's map); `bank` is only read.
    Keys: status, annotated_tasks, variant_in_use, variant_reason, variants {name: {mean_ap,
    classes}}, classes (the variant in use, with pr and histogram per class), thresholds
    (calibrated, None = global default), curve, confusion, misses, cost {matches, seconds}.
    """
    started = time.perf_counter()
    variants = dict(variants) if variants is not None else {settings.faithful: None}
    if settings.faithful not in variants:
        raise ValueError(f"variants must include the faithful method {settings.faithful!r}")
    ids = [t.task_id for t in tasks]
    if len(set(ids)) != len(ids):
        raise ValueError("task ids must be unique")
    truth = Truth(tasks)

    def fold(i: int) -> dict[str, Found]:
        task = truth.tasks[i]
        held_out = bank_subset(bank, drop=task.groups)   # never the task's own references
        return {name: _detect(match, task, held_out, opts) for name, opts in variants.items()}

    folds = list(map_fn(fold, range(len(truth.tasks))))
    scored = {name: Scored(truth, {i: f[name] for i, f in enumerate(folds)}) for name in variants}
    tables = {name: findings.class_table(s, bank, settings) for name, s in scored.items()}
    chosen, reason = calibration.choose_variant(
        {name: s.mean_ap() for name, s in scored.items()}, len(truth.tasks), truth.tasks_per_class,
        faithful=settings.faithful, min_tasks=settings.min_tasks_for_variant,
        min_per_class=settings.min_tasks_per_class_for_variant)
    best = scored[chosen]
    details = findings.details(best, settings.histogram_bins)
    classes = {label: {**row, **details[label]} for label, row in tables[chosen].items()}
    confusion, overlaps = findings.confusion(truth, best.found, findings.thresholds(classes, settings))
    curve, curve_matches = _learning_curve(truth, bank, match, variants[chosen], best, settings, map_fn)
    return {
        "status": "done",
        "annotated_tasks": len(truth.tasks),
        "variant_in_use": chosen,
        "variant_reason": reason,
        "variants": {name: {"mean_ap": s.mean_ap(), "classes": tables[name]} for name, s in scored.items()},
        "classes": classes,
        "thresholds": {label: row["calibrated_threshold"] for label, row in classes.items()},
        "curve": curve,
        "confusion": confusion,
        "misses": findings.misses(best, classes, overlaps, settings.gallery_size),
        "settings": {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in asdict(settings).items()},
        "cost": {"matches": len(truth.tasks) * len(variants) + curve_matches,
                 "seconds": round(time.perf_counter() - started, 3)},
    }
