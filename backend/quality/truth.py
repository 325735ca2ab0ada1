"""Ground truth and detections as pycocotools reads them (the evaluation's data, built once).

Conventions: boxes are continuous pixel-edge coordinates (x0, y0, x1, y1), pixel i spanning
[i, i + 1), as Label Studio rectangles and COCO use them; a detection's inclusive box (model.types)
becomes (x0, y0, x1 + 1, y1 + 1). Masks are HxW bool at the task's image size.
"""
from __future__ import annotations

import contextlib
import io
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from model.types import Detections

TaskId = Hashable


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


def xywh(box: Sequence[float]) -> list[float]:
    """COCO's [x, y, width, height] of a continuous (x0, y0, x1, y1) box."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return [x0, y0, x1 - x0, y1 - y0]


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """pycocotools prints progress on stdout."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


@dataclass
class Found:
    """One task's detections as COCOeval reads them (RLEs, not full masks: folds x variants of
    them are kept at once)."""

    labels: list[str]
    scores: list[float]
    boxes: list[list[float]]        # xywh, continuous
    rles: list[dict]

    @classmethod
    def of(cls, det: Detections, size: tuple[int, int]) -> "Found":
        if tuple(det.image_size) != tuple(size):
            raise ValueError(f"detections of size {tuple(det.image_size)} for an image of size {tuple(size)}")
        boxes = [[float(x0), float(y0), float(x1 - x0 + 1), float(y1 - y0 + 1)] for x0, y0, x1, y1 in det.boxes]
        return cls(list(det.labels), [float(s) for s in det.scores], boxes,
                   [crop_rle(x0, y0, crop, size) for x0, y0, crop in det.masks])


# ------------------------------------------------------------------------------- ground truth
class Truth:
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
                rect = xywh(region.box)
                base = {"id": ann_id, "image_id": i + 1, "category_id": self.cat_ids[region.label],
                        "iscrowd": 0, "bbox": rect}
                box_anns.append({**base, "area": rect[2] * rect[3]})
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
        self.coco = {"bbox": coco_dataset(images, categories, box_anns)}
        if self.mask_classes:
            self.coco["segm"] = coco_dataset(images, categories, mask_anns)

    def iou_type(self, label: str) -> str:
        return "segm" if label in self.mask_classes else "bbox"



def coco_dataset(images: list[dict], categories: list[dict], annotations: list[dict]) -> COCO:
    coco = COCO()
    coco.dataset = {"images": images, "categories": categories, "annotations": annotations}
    with quiet():
        coco.createIndex()
    return coco
