"""bench/coco_fsod.py on a generated mini-COCO (tiny images, two "novel" classes and a base class,
TFA-style split files with 2014 file names, polygon, RLE and box-only references), so the
reproduction script cannot rot unnoticed where COCO and the real weights are not available.

The end-to-end run uses random-weight small models (its nAP is noise: only its range is checked);
the evaluation glue is checked on its own with perfect detections, which must score 100 over the
novel classes only.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import coco_fsod  # noqa: E402

from model.cli import detections_to_coco  # noqa: E402
from model.types import Detections  # noqa: E402

H, W = 64, 80
CATS = [{"id": 1, "name": "person"}, {"id": 17, "name": "cat"}, {"id": 18, "name": "dog"}]
COLOURS = {1: (40, 200, 40), 17: (220, 40, 40), 18: (40, 40, 220)}


def _scene(shapes: list[tuple[int, int, int, int, int]]) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """Image and masks of axis-aligned rectangles (category, x0, y0, x1, y1) on a gradient."""
    yy, xx = np.mgrid[0:H, 0:W]
    image = np.stack([xx * 2, yy * 3, np.full((H, W), 120)], -1).astype(np.uint8)
    out = []
    for cat, x0, y0, x1, y1 in shapes:
        mask = np.zeros((H, W), bool)
        mask[y0:y1, x0:x1] = True
        image[mask] = COLOURS[cat]
        out.append((cat, mask))
    return image, out


def _ann(ann_id: int, image_id: int, cat: int, mask: np.ndarray, kind: str) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    x, y, w, h = mask_utils.toBbox(rle).tolist()
    ann = {"id": ann_id, "image_id": image_id, "category_id": cat, "iscrowd": 0, "bbox": [x, y, w, h],
           "area": float(mask_utils.area(rle))}
    if kind == "polygon":
        ann["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    elif kind == "rle":
        ann["segmentation"] = {"size": [H, W], "counts": rle["counts"].decode("ascii")}
    return ann                                   # "box": no segmentation


def make_mini_coco(root: Path) -> tuple[Path, Path]:
    """(coco root, split dir): 4 reference images in train2017/, 4 target images in val2017/."""
    coco, split = root / "coco", root / "split"
    for d in (coco / "train2017", coco / "val2017", coco / "annotations", split):
        d.mkdir(parents=True)
    refs = {17: [(101, [(17, 10, 10, 40, 40)], "polygon"), (102, [(17, 30, 20, 70, 50), (1, 2, 2, 20, 20)], "polygon")],
            18: [(103, [(18, 20, 10, 60, 45)], "rle"), (104, [(18, 5, 25, 45, 60)], "box")]}
    ann_id = 1000
    for cat, items in refs.items():
        name = next(c["name"] for c in CATS if c["id"] == cat)
        images, anns = [], []
        for image_id, shapes, kind in items:
            image, masks = _scene(shapes)
            Image.fromarray(image).save(coco / "train2017" / f"{image_id:012d}.jpg", quality=95)
            images.append({"id": image_id, "file_name": f"COCO_train2014_{image_id:012d}.jpg", "height": H, "width": W})
            for c, mask in masks:
                if c == cat:
                    ann_id += 1
                    anns.append(_ann(ann_id, image_id, cat, mask, kind))
        (split / f"full_box_30shot_{name}_trainval.json").write_text(json.dumps(
            {"images": images, "annotations": anns, "categories": CATS}))
    targets = {1: [(17, 8, 8, 38, 38), (18, 44, 20, 76, 56)], 2: [(18, 10, 10, 50, 50), (1, 55, 5, 75, 30)],
               3: [(1, 10, 10, 40, 40)], 4: [(17, 30, 20, 70, 60)]}
    images, anns = [], []
    for image_id, shapes in targets.items():
        image, masks = _scene(shapes)
        Image.fromarray(image).save(coco / "val2017" / f"{image_id:012d}.jpg", quality=95)
        images.append({"id": image_id, "file_name": f"{image_id:012d}.jpg", "height": H, "width": W})
        for cat, mask in masks:
            ann_id += 1
            anns.append(_ann(ann_id, image_id, cat, mask, "polygon"))
    (coco / "annotations" / "instances_val2017.json").write_text(json.dumps(
        {"images": images, "annotations": anns, "categories": CATS}))
    return coco, split


def test_coco_fsod_runs_end_to_end_on_a_mini_coco(tmp_path):
    coco, split = make_mini_coco(tmp_path)
    options = ["sam_image_size=256", "dino_image_size=112", "points_per_side=4", "iou_threshold=0",
               "compile_decoder=false"]
    cmd = [sys.executable, "bench/coco_fsod.py", "--coco-root", str(coco), "--split-dir", str(split),
           "--shots", "30", "--classes", "cat,dog", "--variants", "soft,graph", "--limit", "3",
           "--random-weights", "--sam", "sam2.1-t", "--dino", "dinov2-s", "--device", "cpu",
           *[a for o in options for a in ("--option", o)]]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr[-3000:] + out
    assert "references: 4 of 2 classes from 4 images (30-shot split" in out, out
    assert "evaluated: 3 val2017 images; models sam2.1-t + dinov2-s (random weights)" in out, out
    num = r"\s+([\d.]+)"
    rows = dict((m[0], m[1:]) for m in re.findall(r"^(soft|graph)" + num * 4 + r"\s+(\S+)\s+(\S+)$", out, re.M))
    assert set(rows) == {"soft", "graph"}, out
    for values in rows.values():
        assert all(0.0 <= float(v) <= 100.0 for v in values[:4])
    assert rows["soft"][4:] == ("36.8", "34.2") and rows["graph"][4:] == ("-", "-")


def test_perfect_detections_score_100_over_the_novel_classes_only(tmp_path):
    """The evaluation glue: the truth of the novel classes, as Detections through the method's COCO
    conversion, scores 100 segm nAP (base-class truth and images without novel objects are in the
    file and must not count); box nAP50 is 100 too (the reference's box is one pixel short of the
    truth's on each side's far edge: IoU < 0.95 on small objects, so box nAP .50:.95 is lower)."""
    coco, _ = make_mini_coco(tmp_path)
    gt = coco_fsod.COCO(str(coco / "annotations" / "instances_val2017.json"))
    novel = {"cat": 17, "dog": 18}
    results = []
    for image_id in gt.getImgIds():
        anns = [a for a in gt.imgToAnns[image_id] if a["category_id"] in novel.values()]
        masks = [gt.annToMask(a).astype(bool) for a in anns]
        boxes = np.array([[np.flatnonzero(m.any(0))[0], np.flatnonzero(m.any(1))[0],
                           np.flatnonzero(m.any(0))[-1], np.flatnonzero(m.any(1))[-1]] for m in masks], np.float32)
        det = Detections((H, W), boxes.reshape(-1, 4), np.ones(len(anns), np.float32),
                         [gt.cats[a["category_id"]]["name"] for a in anns], [(0, 0, m) for m in masks])
        results.extend(detections_to_coco(det, image_id, novel))
    scores = coco_fsod.evaluate(gt, results, list(novel.values()), gt.getImgIds())
    assert scores["segm"] == (pytest.approx(100.0), pytest.approx(100.0))
    assert scores["bbox"][1] == pytest.approx(100.0) and 0 < scores["bbox"][0] <= 100.0


def test_missing_split_file_is_a_clear_error(tmp_path, capsys):
    coco, split = make_mini_coco(tmp_path)
    assert coco_fsod.main(["--coco-root", str(coco), "--split-dir", str(split), "--shots", "10",
                           "--classes", "cat,dog", "--random-weights"]) == 2
    assert "full_box_10shot_cat_trainval.json" in capsys.readouterr().err
