"""Reproduce the paper's COCO few-shot numbers (issue 13): novel-class nAP, box and segm, of each
matching variant next to the paper's.

  HF_HUB_OFFLINE=1 .venv/bin/python bench/coco_fsod.py --coco-root /data/coco --split-dir /data/cocosplit/seed0 \\
      --shots 30 --sam-checkpoint checkpoints/sam2_hiera_large.pt \\
      --dino-checkpoint checkpoints/dinov2_vitl14_pretrain.pth [--limit 500] [--variants soft,graph]

Inputs:
* --coco-root: `val2017/` (the target images), `annotations/instances_val2017.json` (their truth)
  and the reference images, found by file name or by id (`{id:012d}.jpg`) under `train2017/` or
  `val2017/` (COCO 2017 train + val are 2014's images under the same ids, so the 2014 file names
  of the split files resolve too); --ref-images adds other folders.
* --split-dir: the standard few-shot split files of TFA/FsDet ("Frustratingly Simple Few-Shot
  Object Detection"; `datasets/cocosplit/seed{N}/`, seed 0 at the top level), one per class and
  shot count: `full_box_{shots}shot_{class name}_trainval.json` (the name as COCO spells it, e.g.
  `full_box_30shot_dining table_trainval.json`), a COCO JSON whose `images` and `annotations` are
  that class's references (every box of the class in the sampled images; polygons/RLE when the
  file has them, else the box is turned into a mask by SAM2 as the backend does).

Every annotation of the class in its split file is one reference (bank group: its image). Each
val2017 image (all 5,000, or the first --limit by id) is proposed once and matched with every
variant on the same proposals; all detections are kept (up to K = 100, no threshold, as the
method); COCOeval (box and segm) over the novel classes (--classes; default the 20 PASCAL VOC
classes of COCO-FSOD) on the evaluated images gives nAP (.50:.95) and nAP50, printed in percent.

Paper column: the reference code's README, 30 shots: box 36.8, segm 34.2 (SAM2-L + DINOv2-L at
the headline configuration, its own seed-33 reference sample: at most one instance per image,
boxes >= 32 px away from the border; not a TFA split file, so expect a small gap; its 10-seed
ablation gives box 37.0 +- 0.2, segm 34.4 +- 0.2). No 10-shot figure is printed ("-"): the
reference's README reports only 30 shots.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.bank import MemoryBank  # noqa: E402
from model.cli import annotation_mask, detections_to_coco, load_image  # noqa: E402
from model.engine import Engine, EngineConfig  # noqa: E402
from model.options import MERGES, MethodOptions  # noqa: E402
from model.upsampled import UpsampledMasks  # noqa: E402

NOVEL = ("airplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "dining table",
         "dog", "horse", "motorcycle", "person", "potted plant", "sheep", "couch", "train", "tv")
PAPER = {30: {"bbox": 36.8, "segm": 34.2}}    # reference README (seed-33 references), percent


@dataclass
class ReferenceImage:
    image_id: int
    file_name: str
    annotations: list[tuple[str, dict]]      # (class name, COCO annotation)


def split_path(split_dir: Path, shots: int, name: str) -> Path:
    return split_dir / f"full_box_{shots}shot_{name}_trainval.json"


def read_split(split_dir: Path, shots: int, classes: list[str]) -> list[ReferenceImage]:
    """The references of every class, grouped by image; a clear error for a missing file or class."""
    by_image: dict[int, ReferenceImage] = {}
    for name in classes:
        path = split_path(split_dir, shots, name)
        if not path.is_file():
            raise FileNotFoundError(f"no split file {path} (expected full_box_{{shots}}shot_{{class}}_trainval.json)")
        data = json.loads(path.read_text())
        cat_ids = {c["id"] for c in data.get("categories", []) if c["name"] == name}
        images = {im["id"]: im for im in data["images"]}
        anns = [a for a in data["annotations"] if not a.get("iscrowd")
                and (not cat_ids or a["category_id"] in cat_ids)]
        if not anns:
            raise ValueError(f"{path}: no annotation of class {name!r}")
        for ann in anns:
            im = images[ann["image_id"]]
            ref = by_image.setdefault(im["id"], ReferenceImage(im["id"], im["file_name"], []))
            ref.annotations.append((name, ann))
    return [by_image[k] for k in sorted(by_image)]


def find_image(roots: list[Path], image_id: int, file_name: str) -> Path:
    """A reference image by its file name or its COCO 2017 name, in the first root that has it."""
    names = [file_name, Path(file_name).name, f"{image_id:012d}.jpg"]
    for root in roots:
        for name in names:
            if (root / name).is_file():
                return root / name
    raise FileNotFoundError(f"reference image {image_id} ({file_name}) in none of {[str(r) for r in roots]}")


def build_bank(engine: Engine, refs: list[ReferenceImage], roots: list[Path]) -> tuple[MemoryBank, int]:
    """(bank, references skipped because their mask missed every DINOv2 patch)."""
    bank, skipped = MemoryBank(), 0
    for ref in refs:
        image = load_image(find_image(roots, ref.image_id, ref.file_name))
        h, w = image.shape[:2]
        masks = [annotation_mask(ann, h, w) for _, ann in ref.annotations]
        boxes = [(x, y, x + bw, y + bh) for x, y, bw, bh in (ann["bbox"] for _, ann in ref.annotations)]
        for (name, ann), desc in zip(ref.annotations, engine.encode_references(image, masks=masks, boxes=boxes)):
            if desc is None:
                skipped += 1
            else:
                bank.add(name, f"ann:{ann['id']}", desc, f"img:{ref.image_id}")
    return bank, skipped


def predict(engine: Engine, gt: COCO, image_ids: list[int], image_dir: Path, bank: MemoryBank,
            variants: dict[str, MethodOptions], cat_ids: dict[str, int]) -> dict[str, list[dict]]:
    """COCO results per variant: every image proposed once, matched by each variant."""
    results: dict[str, list[dict]] = {name: [] for name in variants}
    for k, image_id in enumerate(image_ids):
        image = load_image(image_dir / gt.imgs[image_id]["file_name"])
        proposals = engine.propose(image)
        cache = UpsampledMasks(proposals.checksum())
        for name, options in variants.items():
            result = engine.match_full(proposals, bank, score_threshold=0.0, masks=cache, options=options)
            cache.update(result.upsampled)
            results[name].extend(detections_to_coco(result.detections, image_id, cat_ids))
        if (k + 1) % 100 == 0:
            print(f"  {k + 1}/{len(image_ids)} images", file=sys.stderr)
    return results


def evaluate(gt: COCO, results: list[dict], cat_ids: list[int], image_ids: list[int]) -> dict[str, tuple[float, float]]:
    """{"bbox"/"segm": (nAP, nAP50)} in percent over the given categories and images."""
    out = {}
    for iou_type in ("bbox", "segm"):
        if not results:
            out[iou_type] = (0.0, 0.0)
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            ev = COCOeval(gt, gt.loadRes([dict(r) for r in results]), iou_type)
            ev.params.catIds, ev.params.imgIds = list(cat_ids), list(image_ids)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        out[iou_type] = (100 * max(float(ev.stats[0]), 0.0), 100 * max(float(ev.stats[1]), 0.0))
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--coco-root", type=Path, required=True)
    ap.add_argument("--split-dir", type=Path, required=True)
    ap.add_argument("--shots", type=int, default=30, help="10 or 30 (any count whose split files exist)")
    ap.add_argument("--classes", default=",".join(NOVEL), help="comma-separated novel classes (COCO names)")
    ap.add_argument("--ref-images", type=Path, action="append", default=[],
                    help="more folders to find reference images in (repeatable)")
    ap.add_argument("--variants", default="soft,graph", help=f"comma-separated merges: {', '.join(MERGES)}")
    ap.add_argument("--limit", type=int, default=0, help="evaluate the first N val2017 images by id (0: all)")
    g = ap.add_argument_group("models (defaults: the paper's)")
    g.add_argument("--sam", default="sam2-l")
    g.add_argument("--dino", default="dinov2-l")
    g.add_argument("--sam-checkpoint")
    g.add_argument("--dino-checkpoint")
    g.add_argument("--random-weights", action="store_true", help="tests only: the numbers are noise")
    g.add_argument("--device", help="cuda / cpu (default: cuda when present)")
    g.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                   help="override a MethodOptions field (a deviation), e.g. points_per_side=16")
    args = ap.parse_args(argv)
    bad = [v for v in args.variants.split(",") if v not in MERGES]
    if bad:
        ap.error(f"unknown variant(s) {bad}: choose from {list(MERGES)}")
    return args


def method_options(overrides: list[str]) -> MethodOptions:
    """MethodOptions with NAME=VALUE overrides, each value parsed as its field's type."""
    opts = MethodOptions()
    changes = {}
    for item in overrides:
        name, _, value = item.partition("=")
        if not hasattr(opts, name):
            raise ValueError(f"--option {item!r}: MethodOptions has no field {name!r}")
        kind = type(getattr(opts, name))
        changes[name] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return replace(opts, **changes)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    ann_file = args.coco_root / "annotations" / "instances_val2017.json"
    try:
        opts = method_options(args.option)
        refs = read_split(args.split_dir, args.shots, classes)
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO(str(ann_file))
        cat_ids = {c["name"]: c["id"] for c in gt.loadCats(gt.getCatIds()) if c["name"] in classes}
        missing = sorted(set(classes) - set(cat_ids))
        if missing:
            raise ValueError(f"{ann_file}: no category named {missing}")
        engine = Engine(EngineConfig(sam_model=args.sam, dino_model=args.dino, sam_checkpoint=args.sam_checkpoint,
                                     dino_checkpoint=args.dino_checkpoint, random_weights=args.random_weights,
                                     device=args.device, options=opts))
        roots = args.ref_images + [args.coco_root / "train2017", args.coco_root / "val2017"]
        bank, skipped = build_bank(engine, refs, roots)
        image_ids = sorted(gt.getImgIds())
        image_ids = image_ids[:args.limit] if args.limit else image_ids
        variants = {name: replace(opts, merge=name) for name in args.variants.split(",")}
        results = predict(engine, gt, image_ids, args.coco_root / "val2017", bank, variants, cat_ids)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    n_refs = sum(len(bank.refs(c)) for c in bank.classes)
    print(f"references: {n_refs} of {len(classes)} classes from {len(refs)} images "
          f"({args.shots}-shot split {args.split_dir}; {skipped} skipped: mask missed every DINOv2 patch)")
    print(f"evaluated: {len(image_ids)} val2017 images; models {args.sam} + {args.dino}"
          f"{' (random weights)' if args.random_weights else ''}; options changed: "
          f"{', '.join(args.option) or 'none (the headline configuration)'}")
    paper = PAPER.get(args.shots, {})
    print(f"{'variant':<20}{'box nAP':>9}{'nAP50':>8}{'segm nAP':>10}{'nAP50':>8}{'paper box':>11}{'paper segm':>12}")
    for name, found in results.items():
        scores = evaluate(gt, found, list(cat_ids.values()), image_ids)
        ref_box = f"{paper['bbox']:.1f}" if name == "soft" and paper else "-"
        ref_segm = f"{paper['segm']:.1f}" if name == "soft" and paper else "-"
        print(f"{name:<20}{scores['bbox'][0]:>9.1f}{scores['bbox'][1]:>8.1f}{scores['segm'][0]:>10.1f}"
              f"{scores['segm'][1]:>8.1f}{ref_box:>11}{ref_segm:>12}")
    print(f"total {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
