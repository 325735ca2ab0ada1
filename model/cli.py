"""Command line for the custom-dataset workflow of the reference code, without Label Studio:

  python -m model build-bank --refs refs.json --images DIR --out bank.npz
  python -m model predict --bank bank.npz --images DIR --out results.json [--gt gt.json]
  python -m model eval --gt gt.json --results results.json

References are a COCO JSON (instance masks as polygons/RLE, or boxes only: SAM2 turns a box into a
mask). Every annotation is one reference; classes are the category names (any number of shots per
class). Results are COCO detection results with RLE masks; with ground truth, bbox and segm AP are
printed with pycocotools' COCOeval.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

from model.bank import MemoryBank
from model.checkpoints import CheckpointError
from model.engine import Engine, EngineConfig
from model.options import MethodOptions
from model.types import Detections

log = logging.getLogger("model.cli")


def load_image(path: Path) -> np.ndarray:
    """RGB uint8 array with EXIF orientation applied (what a browser shows)."""
    with Image.open(path) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


def annotation_mask(ann: dict, height: int, width: int) -> np.ndarray | None:
    """Binary mask of a COCO annotation, or None if it only has a box."""
    seg = ann.get("segmentation")
    if not seg:
        return None
    if isinstance(seg, list):
        rles = mask_utils.frPyObjects(seg, height, width)
        rle = mask_utils.merge(rles)
    elif isinstance(seg.get("counts"), list):
        rle = mask_utils.frPyObjects(seg, height, width)
    else:
        rle = seg
    return mask_utils.decode(rle).astype(bool)


def build_bank(engine: Engine, refs_json: Path, images_dir: Path, bank: MemoryBank | None = None) -> MemoryBank:
    """Encode every reference annotation of a COCO file into a memory bank keyed by category name."""
    coco = json.loads(refs_json.read_text())
    cats = {c["id"]: c["name"] for c in coco["categories"]}
    by_image: dict[int, list[dict]] = {}
    for ann in coco["annotations"]:
        if not ann.get("iscrowd"):
            by_image.setdefault(ann["image_id"], []).append(ann)
    images = {im["id"]: im for im in coco["images"]}
    bank = bank or MemoryBank()
    skipped = 0
    for image_id, anns in tqdm(sorted(by_image.items()), desc="references", unit="img"):
        image = load_image(images_dir / images[image_id]["file_name"])
        H, W = image.shape[:2]
        masks, boxes = [], []
        for ann in anns:
            masks.append(annotation_mask(ann, H, W))
            x, y, w, h = ann["bbox"]
            boxes.append((x, y, x + w, y + h))
        descriptors = engine.encode_references(image, masks=masks, boxes=boxes)
        for ann, desc in zip(anns, descriptors):
            if desc is None:
                skipped += 1
                continue
            bank.add(cats[ann["category_id"]], f"ann:{ann['id']}", desc, group=f"img:{image_id}")
    if skipped:
        log.warning("%d reference(s) missed every DINOv2 patch and were skipped", skipped)
    return bank


def detections_to_coco(det: Detections, image_id: int, cat_ids: dict[str, int]) -> list[dict]:
    """COCO results; bbox w/h as the reference computes them (x2 - x1 on inclusive indices)."""
    out = []
    for i, label in enumerate(det.labels):
        if label not in cat_ids:
            continue
        x1, y1, x2, y2 = (float(v) for v in det.boxes[i])
        rle = mask_utils.encode(np.asfortranarray(det.mask(i).astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        out.append({"image_id": image_id, "category_id": cat_ids[label], "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": float(det.scores[i]), "segmentation": rle})
    return out


def predict_folder(engine: Engine, bank: MemoryBank, images_dir: Path, gt: dict | None,
                   categories: list[dict], score_threshold: float | None = None) -> list[dict]:
    """Run the method on every image (of the GT file when given, else of the folder)."""
    cat_ids = {c["name"]: c["id"] for c in categories}
    if gt is not None:
        items = [(im["id"], images_dir / im["file_name"]) for im in gt["images"]]
    else:
        files = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".bmp"})
        items = list(enumerate(files, 1))
    results: list[dict] = []
    for image_id, path in tqdm(items, desc="predict", unit="img"):
        det = engine.predict(load_image(path), bank, score_threshold=score_threshold)
        results.extend(detections_to_coco(det, image_id, cat_ids))
    return results


def evaluate(gt_json: Path, results: list[dict]) -> dict[str, float]:
    """bbox and segm AP (COCOeval over all GT images); prints the standard tables."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_json))
    stats = {}
    for iou_type in ("bbox", "segm"):
        if not results:
            stats[iou_type] = 0.0
            continue
        coco_dt = coco_gt.loadRes([dict(r) for r in results])
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        stats[iou_type] = float(ev.stats[0])
    print(f"bbox AP {stats['bbox']:.3f}  segm AP {stats['segm']:.3f}")
    return stats


def _engine(args: argparse.Namespace) -> Engine:
    opts = MethodOptions()
    overrides = {k: v for k, v in {"sam_image_size": args.sam_image_size, "dino_image_size": args.dino_image_size,
                                   "points_per_side": args.points_per_side}.items() if v}
    opts = replace(opts, **overrides)
    return Engine(EngineConfig(sam_model=args.sam, dino_model=args.dino, sam_checkpoint=args.sam_checkpoint,
                               dino_checkpoint=args.dino_checkpoint, random_weights=args.random_weights,
                               device=args.device, options=opts))


def _model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models")
    g.add_argument("--sam", default="sam2-l", help="sam2-t/s/b+/l or sam2.1-t/s/b+/l (default: sam2-l, the paper's)")
    g.add_argument("--dino", default="dinov2-l", help="dinov2-s/b/l/g (default: dinov2-l)")
    g.add_argument("--sam-checkpoint", help="official SAM2 .pt file")
    g.add_argument("--dino-checkpoint", help="Meta dinov2_vit*14_pretrain.pth file")
    g.add_argument("--random-weights", action="store_true", help="random weights (tests only; results are noise)")
    g.add_argument("--device", help="cuda / cpu (default: cuda when present)")
    g.add_argument("--sam-image-size", type=int, help="deviation: SAM2 input size (default 1024)")
    g.add_argument("--dino-image-size", type=int, help="deviation: DINOv2 input size (default 518)")
    g.add_argument("--points-per-side", type=int, help="deviation: prompt grid (default 32)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build-bank", help="COCO references + images -> memory bank file")
    b.add_argument("--refs", type=Path, required=True, help="COCO JSON of reference instances")
    b.add_argument("--images", type=Path, required=True, help="folder of the reference images")
    b.add_argument("--out", type=Path, required=True, help="bank file to write (.npz)")
    _model_args(b)
    p = sub.add_parser("predict", help="bank + target images -> COCO results JSON (+ AP with --gt)")
    p.add_argument("--bank", type=Path, required=True)
    p.add_argument("--refs", type=Path, required=True, help="the references' COCO JSON (for category ids)")
    p.add_argument("--images", type=Path, required=True, help="folder of target images")
    p.add_argument("--out", type=Path, required=True, help="COCO results JSON to write")
    p.add_argument("--gt", type=Path, help="target ground truth COCO JSON: images to run + AP printout")
    p.add_argument("--score-threshold", type=float, default=None, help="default: none (the method's)")
    _model_args(p)
    e = sub.add_parser("eval", help="print bbox and segm AP of a results file")
    e.add_argument("--gt", type=Path, required=True)
    e.add_argument("--results", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.cmd == "build-bank":
            bank = build_bank(_engine(args), args.refs, args.images)
            bank.save(args.out)
            print(f"bank: {len(bank)} references, {len(bank.classes)} classes, version {bank.version} -> {args.out}")
        elif args.cmd == "predict":
            bank = MemoryBank.load(args.bank)
            gt = json.loads(args.gt.read_text()) if args.gt else None
            cats = json.loads(args.refs.read_text())["categories"]
            results = predict_folder(_engine(args), bank, args.images, gt, cats, args.score_threshold)
            args.out.write_text(json.dumps(results))
            print(f"{len(results)} detections -> {args.out}")
            if args.gt:
                evaluate(args.gt, results)
        else:
            evaluate(args.gt, json.loads(args.results.read_text()))
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
