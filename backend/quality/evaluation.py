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

Conventions: boxes are continuous pixel-edge coordinates (x0, y0, x1, y1), pixel i spanning
[i, i + 1), as Label Studio rectangles and COCO use them; a detection's inclusive box (model.types)
becomes (x0, y0, x1 + 1, y1 + 1). Masks are HxW bool at the task's image size.
"""
from __future__ import annotations

import contextlib
import io
import random
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from backend.quality import calibration
from model.bank import MemoryBank
from model.types import Detections

TaskId = Hashable
Matcher = Callable[[TaskId, MemoryBank, Any], Detections]
MATCH_IOU = 0.5          # COCOeval's first IoU threshold: true/false positives, confusion, thresholds
BACKGROUND = None        # confusion: a detection overlapping no ground truth at MATCH_IOU


@dataclass(frozen=True)
class TruthRegion:
    """One annotated region: a label with a mask (brush, polygon) or only a box (rectangle)."""

    label: str
    box: tuple[float, float, float, float] | None = None
    mask: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.mask is None and self.box is None:
            raise ValueError(f"region {self.label!r} has neither mask nor box")
        if self.box is None:
            object.__setattr__(self, "box", mask_box(self.mask))


@dataclass(frozen=True)
class AnnotatedTask:
    """A task's ground truth and the bank groups (annotation ids) its references were stored under."""

    task_id: TaskId
    image_size: tuple[int, int]
    truth: tuple[TruthRegion, ...]
    groups: frozenset[str]


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


# ---------------------------------------------------------------------------------- small helpers
def mask_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """Continuous box (x0, y0, x1 + 1, y1 + 1) of a bool mask; zeros for an empty mask."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not rows.size:
        return 0.0, 0.0, 0.0, 0.0
    return float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)


def crop_rle(x0: int, y0: int, crop: np.ndarray, size: tuple[int, int]) -> dict:
    """COCO compressed RLE of an HxW mask that is zero outside `crop` placed at (x0, y0).

    COCO RLE runs column by column, so the columns the crop spans are one contiguous stretch:
    only that H x w band is scanned (a detection's mask is stored as a crop, model.types).
    """
    H, W = size
    h, w = crop.shape
    band = np.zeros((w, H), dtype=bool)                    # band[c] = image column x0 + c
    band[:, y0:y0 + h] = crop.T
    flat = band.reshape(-1)
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist() if flat.size else []
    if flat.size and flat[0]:
        runs.insert(0, 0)                                  # RLE starts with a run of zeros
    runs = runs or [0]
    runs[0] += x0 * H
    after = (W - x0 - w) * H
    if len(runs) % 2:                                      # ends on zeros: extend that run
        runs[-1] += after
    elif after:
        runs.append(after)
    return mask_utils.frPyObjects({"size": [H, W], "counts": runs}, H, W)


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


def _xywh(box: Sequence[float]) -> list[float]:
    x0, y0, x1, y1 = (float(v) for v in box)
    return [x0, y0, x1 - x0, y1 - y0]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """pycocotools prints progress on stdout."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


# ------------------------------------------------------------------------- detections, compactly
@dataclass
class _Found:
    """One task's detections as COCOeval reads them (RLEs, not full masks: folds x variants of
    them are kept at once)."""

    labels: list[str]
    scores: list[float]
    boxes: list[list[float]]        # xywh, continuous
    rles: list[dict]

    @classmethod
    def of(cls, det: Detections, size: tuple[int, int]) -> "_Found":
        if tuple(det.image_size) != tuple(size):
            raise ValueError(f"detections of size {tuple(det.image_size)} for an image of size {tuple(size)}")
        boxes = [[float(x0), float(y0), float(x1 - x0 + 1), float(y1 - y0 + 1)] for x0, y0, x1, y1 in det.boxes]
        return cls(list(det.labels), [float(s) for s in det.scores], boxes,
                   [crop_rle(x0, y0, crop, size) for x0, y0, crop in det.masks])


def _detect(match: Matcher, task: AnnotatedTask, bank: MemoryBank, options: Any) -> _Found:
    """The task's detections by `bank`; an empty bank (a one-task project's fold) finds nothing
    without asking the matcher."""
    det = match(task.task_id, bank, options) if len(bank) else Detections.empty(task.image_size)
    return _Found.of(det, task.image_size)


# ------------------------------------------------------------------------------- ground truth
class _Truth:
    """The tasks' ground truth as COCO datasets (built once, scored many times)."""

    def __init__(self, tasks: Sequence[AnnotatedTask]) -> None:
        self.tasks = list(tasks)
        regions = [r for t in self.tasks for r in t.truth]
        self.labels = sorted({r.label for r in regions})
        self.cat_ids = {label: k + 1 for k, label in enumerate(self.labels)}
        self.mask_classes = {label for label in self.labels
                             if all(r.mask is not None for r in regions if r.label == label)}
        self.tasks_per_class = {label: sum(any(r.label == label for r in t.truth) for t in self.tasks)
                                for label in self.labels}
        self.instances = {label: sum(r.label == label for r in regions) for label in self.labels}
        self.gt_rles: list[list[dict | None]] = []
        images, box_anns, mask_anns = [], [], []
        self.origin: dict[int, tuple[int, int]] = {}         # annotation id -> (task, region)
        for i, task in enumerate(self.tasks):
            H, W = task.image_size
            images.append({"id": i + 1, "height": H, "width": W})
            rles = []
            for j, region in enumerate(task.truth):
                ann_id = len(self.origin) + 1
                self.origin[ann_id] = (i, j)
                xywh = _xywh(region.box)
                base = {"id": ann_id, "image_id": i + 1, "category_id": self.cat_ids[region.label],
                        "iscrowd": 0, "bbox": xywh}
                box_anns.append({**base, "area": xywh[2] * xywh[3]})
                rle = None
                if region.mask is not None:
                    if region.mask.shape != (H, W):
                        raise ValueError(f"task {task.task_id}: mask of shape {region.mask.shape} "
                                         f"for an image of size {(H, W)}")
                    rle = mask_utils.encode(np.asfortranarray(region.mask.astype(np.uint8)))
                    if region.label in self.mask_classes:
                        mask_anns.append({**base, "segmentation": rle, "area": float(mask_utils.area(rle))})
                rles.append(rle)
            self.gt_rles.append(rles)
        categories = [{"id": k, "name": label} for label, k in self.cat_ids.items()]
        self.coco = {"bbox": _coco(images, categories, box_anns)}
        if self.mask_classes:
            self.coco["segm"] = _coco(images, categories, mask_anns)

    def iou_type(self, label: str) -> str:
        return "segm" if label in self.mask_classes else "bbox"

    def score(self, found: Mapping[int, _Found]) -> "_Scored":
        """COCOeval of the detections of the tasks in `found` (task index -> detections)."""
        return _Scored(self, found)


def _coco(images: list[dict], categories: list[dict], annotations: list[dict]) -> COCO:
    coco = COCO()
    coco.dataset = {"images": images, "categories": categories, "annotations": annotations}
    with _quiet():
        coco.createIndex()
    return coco


# ------------------------------------------------------------------------------------ scoring
@dataclass
class _ClassScore:
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
        """The class's own AP: mask AP for mask classes, box AP otherwise (set by _Scored)."""
        return self.mask_ap if self.mask_ap is not None else self.box_ap


class _Scored:
    """Per-class COCOeval results of one set of detections over the tasks they cover."""

    def __init__(self, truth: _Truth, found: Mapping[int, _Found]) -> None:
        self.truth, self.found = truth, found
        self.image_ids = sorted(i + 1 for i in found)
        present = {truth.tasks[i].truth[j].label for i in found for j in range(len(truth.tasks[i].truth))}
        self.classes: dict[str, _ClassScore] = {label: _ClassScore() for label in truth.labels if label in present}
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
            with _quiet():
                ev = COCOeval(coco_gt, coco_gt.loadRes(results), iou_type)
                ev.params.imgIds = self.image_ids
                ev.params.catIds = [self.truth.cat_ids[c] for c in labels]
                ev.evaluate()
                ev.accumulate()
        for k, label in enumerate(labels):
            c = self.classes[label]
            ap, ap50, pr50 = _class_ap(ev, k)
            if iou_type == "bbox":
                c.box_ap, c.box_ap50 = ap, ap50
            else:
                c.mask_ap, c.mask_ap50 = ap, ap50
            if iou_type == self.truth.iou_type(label):
                c.pr50 = pr50
                self._matches(ev, label, c, origin)

    def _matches(self, ev: COCOeval | None, label: str, c: _ClassScore, origin: list[tuple[int, int]]) -> None:
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


def _class_ap(ev: COCOeval | None, k: int) -> tuple[float | None, float | None, list[float]]:
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


# ------------------------------------------------------------------------------ class tables
def _class_table(scored: _Scored, bank: MemoryBank, settings: EvaluationSettings) -> dict[str, dict]:
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


def _details(scored: _Scored, bins: int) -> dict[str, dict]:
    """PR curve at IoU 0.5 and TP/FP score histograms per class (for the report)."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    return {label: {"pr": {"recall": [round(r, 2) for r in np.linspace(0, 1, 101)] if c.pr50 else [],
                           "precision": c.pr50},
                    "histogram": {"edges": [round(float(e), 4) for e in edges],
                                  "tp": np.histogram(np.clip(c.tp_scores, 0, 1), edges)[0].tolist(),
                                  "fp": np.histogram(np.clip(c.fp_scores, 0, 1), edges)[0].tolist()}}
            for label, c in scored.classes.items()}


def _thresholds(classes: Mapping[str, dict], settings: EvaluationSettings) -> Callable[[str], float]:
    def of(label: str) -> float:
        if label in classes:
            return classes[label]["threshold"]
        return calibration.threshold_in_force(settings.default_threshold, None,
                                              settings.control_thresholds.get(label))[0]
    return of


def _confusion(truth: _Truth, found: Mapping[int, _Found], threshold: Callable[[str], float]
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
            box_iou = np.asarray(mask_utils.iou([f.boxes[d] for d in kept], [_xywh(r.box) for r in regions],
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


def _misses(scored: _Scored, classes: Mapping[str, dict], overlaps: Mapping[tuple[int, int], str | None],
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


# ------------------------------------------------------------------------------ orchestration
def _curve_sizes(n: int) -> list[int]:
    """1, 2, 4, ... below n - 1 (n - 1, all but one, is the leave-one-out result itself)."""
    sizes, k = [], 1
    while k < n - 1:
        sizes.append(k)
        k *= 2
    return sizes


def _learning_curve(truth: _Truth, bank: MemoryBank, match: Matcher, options: Any, loo: _Scored,
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
            ap = truth.score(dict(zip(held, dets))).mean_ap()
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
    truth = _Truth(tasks)

    def fold(i: int) -> dict[str, _Found]:
        task = truth.tasks[i]
        held_out = bank_subset(bank, drop=task.groups)   # never the task's own references
        return {name: _detect(match, task, held_out, opts) for name, opts in variants.items()}

    folds = list(map_fn(fold, range(len(truth.tasks))))
    scored = {name: truth.score({i: f[name] for i, f in enumerate(folds)}) for name in variants}
    tables = {name: _class_table(s, bank, settings) for name, s in scored.items()}
    chosen, reason = calibration.choose_variant(
        {name: s.mean_ap() for name, s in scored.items()}, len(truth.tasks), truth.tasks_per_class,
        faithful=settings.faithful, min_tasks=settings.min_tasks_for_variant,
        min_per_class=settings.min_tasks_per_class_for_variant)
    best = scored[chosen]
    details = _details(best, settings.histogram_bins)
    classes = {label: {**row, **details[label]} for label, row in tables[chosen].items()}
    confusion, overlaps = _confusion(truth, best.found, _thresholds(classes, settings))
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
        "misses": _misses(best, classes, overlaps, settings.gallery_size),
        "settings": {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in asdict(settings).items()},
        "cost": {"matches": len(truth.tasks) * len(variants) + curve_matches,
                 "seconds": round(time.perf_counter() - started, 3)},
    }
