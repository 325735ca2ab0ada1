"""Synthetic projects for the quality tests: ground truth, a bank grouped by annotation, and
detections built from full masks (as model.types.Detections holds them: inclusive boxes, crops)."""
from __future__ import annotations

import numpy as np

from backend.quality.evaluation import AnnotatedTask, TruthRegion
from model.bank import MemoryBank
from model.types import Detections

SIZE = (40, 60)


def rect_mask(x0: int, y0: int, x1: int, y1: int, size: tuple[int, int] = SIZE) -> np.ndarray:
    """Mask of the pixels x0..x1-1, y0..y1-1 (continuous box (x0, y0, x1, y1))."""
    m = np.zeros(size, bool)
    m[y0:y1, x0:x1] = True
    return m


def detections(items: list[tuple[str, float, np.ndarray]], size: tuple[int, int] = SIZE) -> Detections:
    """(label, score, full mask) -> Detections, best first."""
    items = sorted(items, key=lambda it: -it[1])
    boxes, masks = [], []
    for _, _, m in items:
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        x0, y0, x1, y1 = int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])
        boxes.append([x0, y0, x1, y1])
        masks.append((x0, y0, m[y0:y1 + 1, x0:x1 + 1].copy()))
    return Detections(size, np.array(boxes, np.float32).reshape(-1, 4),
                      np.array([s for _, s, _ in items], np.float32), [label for label, _, _ in items], masks)


def project_bank(tasks: list[AnnotatedTask], dim: int = 8, seed: int = 0) -> MemoryBank:
    """One reference per ground-truth region, grouped by the task's annotation id."""
    rng = np.random.default_rng(seed)
    bank = MemoryBank(dim)
    for task in tasks:
        (group,) = task.groups
        for j, region in enumerate(task.truth):
            bank.add(region.label, f"{group}:{j}", rng.standard_normal(dim).astype(np.float32), group)
    return bank


def random_project(n_tasks: int, seed: int = 0) -> tuple[list[AnnotatedTask], dict]:
    """Tasks with 'cat' (masks) and 'box' (rectangles only) regions, and per task a fixed list of
    detections: jittered copies of the regions (sometimes mislabelled), plus false blobs."""
    rng = np.random.default_rng(seed)
    tasks, found = [], {}
    for t in range(n_tasks):
        truth, items = [], []
        for _ in range(int(rng.integers(1, 4))):
            label = str(rng.choice(["cat", "box"]))
            x0, y0 = int(rng.integers(0, 45)), int(rng.integers(0, 28))
            x1, y1 = x0 + int(rng.integers(4, 15)), y0 + int(rng.integers(4, 12))
            x1, y1 = min(x1, SIZE[1]), min(y1, SIZE[0])
            mask = rect_mask(x0, y0, x1, y1)
            if label == "cat":
                mask[y0, x0] = False           # not a rectangle: mask and box IoU differ
                truth.append(TruthRegion("cat", mask=mask))
            else:
                truth.append(TruthRegion("box", box=(float(x0), float(y0), float(x1), float(y1))))
            for _ in range(int(rng.integers(0, 3))):
                dx, dy = (int(v) for v in rng.integers(-3, 4, 2))
                moved = np.roll(np.roll(mask, dx, 1), dy, 0)
                if moved.any():
                    wrong = rng.random() < 0.2
                    items.append(({"cat": "box", "box": "cat"}[label] if wrong else label,
                                  float(rng.uniform(0.05, 1.0)), moved))
        for _ in range(int(rng.integers(0, 3))):
            x0, y0 = int(rng.integers(0, 50)), int(rng.integers(0, 30))
            items.append((str(rng.choice(["cat", "box"])), float(rng.uniform(0.05, 1.0)),
                          rect_mask(x0, y0, x0 + 8, y0 + 8)))
        task_id = 100 + t
        tasks.append(AnnotatedTask(task_id, SIZE, tuple(truth), frozenset({f"ann{t}"})))
        found[task_id] = detections(items)
    return tasks, found
