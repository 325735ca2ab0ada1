"""Synthetic quality benchmark whose truth is known (issue 13): AP and false regions per image of
the method's variants and thresholds, side by side on the same proposals.

  HF_HUB_OFFLINE=1 .venv/bin/python bench/quality_synthetic.py            # default run (a few minutes on 2 CPU cores)
  HF_HUB_OFFLINE=1 .venv/bin/python bench/quality_synthetic.py --quick    # the smoke test's size (< 1 min)

Scenes: shapes of four annotated classes (disc, square, triangle, star), each with its own colour
and texture, plus an unannotated decoy (an orange ring), on textured backgrounds; seeded.

Proposals: SAM2's decoder output is replaced at the engine's seam (model.proposals.decode_points)
by masks derived from the truth, with a predicted IoU each: per object (decoys too) the whole
object, a dilated one, a part (one side of a cut through its centre) and the object merged with
its nearest neighbour, plus background blobs. Everything after the decoder runs for real
(compute_proposals, as Engine.propose: DINOv2 on the image, IoU filter, mask pooling;
Engine.match: labels, NMS, merge). SAM2's image encoder is skipped (its output would be unused:
a placeholder embedding stands in for it); DINOv2-S has
random weights re-drawn so that its features separate the shapes (LayerScale gammas U(0.1, 0.5),
linear and patch weights N(0, 1/fan_in), biases 0); the cosines it gives are printed.

Split (images in order): the first --references images are annotated references (the bank; each
holds every class once); the
next --calibration images are annotated tasks that calibrate the thresholds
(backend.quality.evaluation.evaluate_project with the full reference bank: its per-class best-F1
thresholds, for each variant) and are also the one round of corrections (their predictions at the
calibrated thresholds, compared with their truth by model.corrections.find_negatives; each
negative's descriptor is encoded from the predicted region, as the backend does); the rest are
the test images, on which every row is scored and which nothing above saw.

Rows: per matching variant, detections kept at no threshold (the method: all, up to K), at a fixed
0.5, at the calibrated thresholds; negatives rows use the soft merge's calibrated thresholds.
Columns: COCO mask AP (.50:.95) and AP50 over the four classes (pycocotools COCOeval on the kept
detections), recall at IoU 0.5, and false regions per image (kept detections that COCOeval's
matching at IoU 0.5 leaves unmatched: decoys, blobs, parts, merges, duplicates, wrong labels).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from unittest import mock

import cv2
import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from timm.layers import LayerScale
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.quality.calibration import threshold_in_force  # noqa: E402
from backend.quality.evaluation import AnnotatedTask, TruthRegion, evaluate_project  # noqa: E402
from backend.quality.truth import crop_rle  # noqa: E402
from model import proposals as proposals_module  # noqa: E402
from model.bank import MemoryBank  # noqa: E402
from model.corrections import Region, find_negatives  # noqa: E402
from model.engine import Engine, EngineConfig  # noqa: E402
from model.options import MethodOptions  # noqa: E402
from model.proposals import SamImageState, compute_proposals  # noqa: E402
from model.types import Detections, Proposals  # noqa: E402
from model.upsampled import UpsampledMasks  # noqa: E402

CLASSES = ("disc", "square", "triangle", "star")
DECOY = "ring"
# base colour, texture kind
LOOKS = {"disc": ((205, 45, 40), "dots"), "square": ((40, 70, 205), "hstripes"),
         "triangle": ((40, 170, 60), "dstripes"), "star": ((230, 200, 40), "checker"),
         DECOY: ((215, 110, 40), "rings")}


# ------------------------------------------------------------------------------------ scenes
@dataclass
class Scene:
    image: np.ndarray                      # HxWx3 uint8
    objects: list[tuple[str, np.ndarray]]  # (class or DECOY, HxW bool mask)

    @property
    def truth(self) -> list[tuple[str, np.ndarray]]:
        """The annotated regions (decoys are not annotated)."""
        return [(label, m) for label, m in self.objects if label != DECOY]


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    if kind == "square":
        t = angle + np.pi / 4 + np.arange(4) * np.pi / 2
        radii = np.full(4, r)
    elif kind == "triangle":
        t = angle + np.arange(3) * 2 * np.pi / 3
        radii = np.full(3, r * 1.3)
    else:  # star
        t = angle + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r * 1.15, r * 0.65)
    return np.stack([cx + radii * np.cos(t), cy + radii * np.sin(t)], 1).round().astype(np.int32)


def shape_mask(kind: str, size: tuple[int, int], cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    d2 = (xx - cx) ** 2 + (yy - cy) ** 2
    if kind == "disc":
        return d2 < r * r
    if kind == DECOY:
        return (d2 < r * r) & (d2 > (0.45 * r) ** 2)
    canvas = np.zeros(size, np.uint8)
    cv2.fillPoly(canvas, [_polygon(kind, cx, cy, r, angle)], 1)
    return canvas.astype(bool)


def _texture(kind: str, size: tuple[int, int], period: float, phase: float) -> np.ndarray:
    """[0, 1] pattern of the class's texture."""
    yy, xx = np.mgrid[0:size[0], 0:size[1]].astype(np.float32)
    f = 2 * np.pi / period
    if kind == "dots":
        return ((np.sin(f * xx + phase) * np.sin(f * yy + phase)) > 0.3).astype(np.float32)
    if kind == "hstripes":
        return (np.sin(f * yy + phase) > 0).astype(np.float32)
    if kind == "dstripes":
        return (np.sin(f * (xx + yy) / 1.4 + phase) > 0).astype(np.float32)
    if kind == "checker":
        return ((np.sin(f * xx + phase) > 0) ^ (np.sin(f * yy + phase) > 0)).astype(np.float32)
    return 0.5 + 0.5 * np.sin(f * np.hypot(xx - size[1] / 2, yy - size[0] / 2) + phase)


def _background(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """Muted base colour, smooth blotches and grain."""
    h, w = size
    base = rng.uniform(100, 160, 3)
    blotch = cv2.GaussianBlur(rng.standard_normal((h, w, 3)).astype(np.float32), (0, 0), 9)
    blotch *= 20 / max(float(blotch.std()), 1e-6)
    grain = rng.normal(0, 5, (h, w, 3))
    return base + blotch + grain


def make_scene(seed: int, size: tuple[int, int], decoy_rate: float = 0.5, every_class: bool = False) -> Scene:
    """3-5 non-overlapping shapes of the annotated classes (each of them once with `every_class`),
    and a decoy ring in some images."""
    rng = np.random.default_rng(seed)
    h, w = size
    image = _background(rng, size)
    kinds = list(CLASSES) if every_class else list(rng.choice(CLASSES, int(rng.integers(3, 6))))
    if rng.random() < decoy_rate:
        kinds.append(DECOY)
    placed: list[tuple[float, float, float]] = []
    objects = []
    r_lo, r_hi = min(h, w) / 12, min(h, w) / 7
    for kind in kinds:
        for _ in range(50):   # rejection sampling of a free spot
            r = rng.uniform(r_lo, r_hi)
            cx, cy = rng.uniform(r + 2, w - r - 2), rng.uniform(r + 2, h - r - 2)
            if all(np.hypot(cx - x, cy - y) > 1.25 * (r + q) + 3 for x, y, q in placed):
                break
        else:
            continue
        placed.append((cx, cy, r))
        mask = shape_mask(kind, size, cx, cy, r, rng.uniform(0, 2 * np.pi))
        colour, tex = LOOKS[kind]
        pattern = _texture(tex, size, 6.0, rng.uniform(0, 2 * np.pi))
        shade = np.asarray(colour) + rng.uniform(-10, 10, 3)
        image[mask] = (shade[None] * (0.8 + 0.2 * pattern[mask][:, None]))
        objects.append((kind, mask))
    return Scene(np.clip(image, 0, 255).astype(np.uint8), objects)


# -------------------------------------------------------------------------- injected proposals
def decoder_output(scene: Scene, rng: np.random.Generator, blobs: int) -> list[tuple[np.ndarray, float]]:
    """(mask, predicted IoU) as SAM2's decoder could give them: per object the whole, dilated, a
    part and a merge with its nearest neighbour; plus background blobs."""
    h, w = scene.image.shape[:2]
    out = []
    centres = [np.argwhere(m).mean(0) for _, m in scene.objects]
    for k, (_, mask) in enumerate(scene.objects):
        out.append((mask, rng.uniform(0.88, 0.98)))
        grow = int(rng.integers(3, 7))
        out.append((cv2.dilate(mask.astype(np.uint8), np.ones((2 * grow + 1,) * 2, np.uint8)).astype(bool),
                    rng.uniform(0.75, 0.9)))
        yy, xx = np.mgrid[0:h, 0:w]
        t = rng.uniform(0, np.pi)
        side = (xx - centres[k][1]) * np.cos(t) + (yy - centres[k][0]) * np.sin(t) > 0
        out.append((mask & side, rng.uniform(0.6, 0.85)))
        if len(scene.objects) > 1:
            near = min((j for j in range(len(scene.objects)) if j != k),
                       key=lambda j: float(np.hypot(*(centres[j] - centres[k]))))
            out.append((mask | scene.objects[near][1], rng.uniform(0.5, 0.75)))
    taken = np.logical_or.reduce([m for _, m in scene.objects]) if scene.objects else np.zeros((h, w), bool)
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(blobs):
        for _ in range(30):
            cx, cy = rng.uniform(0, w), rng.uniform(0, h)
            rx, ry = rng.uniform(w / 16, w / 6), rng.uniform(h / 16, h / 6)
            blob = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1
            if (blob & taken).sum() < 0.1 * blob.sum():
                out.append((blob, rng.uniform(0.5, 0.9)))
                break
    return [(m, float(q)) for m, q in out if m.any()]


def lowres_logits(masks: Sequence[np.ndarray], side: int) -> torch.Tensor:
    """[N, side, side] logits over the S×S square SAM2 sees (aspect ratio ignored, as the method):
    each mask's area fraction per low-res pixel, mapped so that > half covered is positive."""
    cover = [cv2.resize(m.astype(np.float32), (side, side), interpolation=cv2.INTER_AREA) for m in masks]
    return torch.from_numpy((np.stack(cover) - 0.5) * 16.0)


@contextlib.contextmanager
def injected_decoder(logits: torch.Tensor, iou: torch.Tensor) -> Iterator[None]:
    """model.proposals.decode_points returns these instead of running SAM2's mask decoder."""
    def decode(sam, state, points, batch_size, compiled=False):
        return logits.to(state.image_embed.device), iou.to(state.image_embed.device)
    with mock.patch.object(proposals_module, "decode_points", decode):
        yield


def propose(engine: Engine, scene: Scene, seed: int, blobs: int) -> Proposals:
    """model.proposals.compute_proposals (what Engine.propose runs) with the injected decoder
    output; SAM2's image embedding is a placeholder, as nothing reads it."""
    masks, ious = zip(*decoder_output(scene, np.random.default_rng(seed), blobs))
    size = engine.options.sam_image_size
    placeholder = SamImageState(torch.zeros(1, 1, 1, 1), [], size, scene.image.shape[:2])
    with injected_decoder(lowres_logits(masks, size // 4), torch.tensor(ious, dtype=torch.float32)):
        return compute_proposals(engine.sam, engine.dino, scene.image, engine.options, state=placeholder)


# -------------------------------------------------------------------------------------- models
def redraw_dino(dino: nn.Module, seed: int) -> None:
    """Random weights under which DINOv2's features separate colours and textures: LayerScale gammas
    U(0.1, 0.5), linear and patch-embedding weights N(0, 1/fan_in), their biases 0 (timm's init
    gives near-identical features to every region)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in dino.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                module.weight.normal_(0.0, module.weight[0].numel() ** -0.5, generator=g)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, LayerScale):
                module.gamma.uniform_(0.1, 0.5, generator=g)


def cosine_summary(descriptors: Sequence[tuple[str, np.ndarray]]) -> tuple[float, float, float, float]:
    """(mean, min) cosine between instances of one class, (mean, max) between classes."""
    labels = [label for label, _ in descriptors]
    x = np.stack([d / np.linalg.norm(d) for _, d in descriptors])
    cos = x @ x.T
    same = np.equal.outer(labels, labels) & ~np.eye(len(labels), dtype=bool)
    other = ~np.equal.outer(labels, labels)
    return float(cos[same].mean()), float(cos[same].min()), float(cos[other].mean()), float(cos[other].max())


# ------------------------------------------------------------------------------------- scoring
@dataclass
class Score:
    ap: float
    ap50: float
    recall: float
    false_per_image: float


def score(truths: Sequence[list[tuple[str, np.ndarray]]], dets: Sequence[Detections],
          threshold: dict[str, float] | float) -> Score:
    """COCO mask AP of the detections with score >= their class's threshold, recall and false
    regions per image from COCOeval's matching at IoU 0.5 (all areas, 100 detections)."""
    cats = {label: k + 1 for k, label in enumerate(CLASSES)}
    images, anns, results = [], [], []
    for i, (truth, det) in enumerate(zip(truths, dets)):
        h, w = det.image_size
        images.append({"id": i + 1, "height": h, "width": w})
        for label, mask in truth:
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cats[label], "iscrowd": 0,
                         "segmentation": rle, "area": float(mask_utils.area(rle)),
                         "bbox": mask_utils.toBbox(rle).tolist()})
        for d, label in enumerate(det.labels):
            t = threshold if isinstance(threshold, float) else threshold[label]
            if det.scores[d] >= t:
                x0, y0, crop = det.masks[d]
                results.append({"image_id": i + 1, "category_id": cats[label], "score": float(det.scores[d]),
                                "segmentation": crop_rle(x0, y0, crop, (h, w))})
    if not results:
        return Score(0.0, 0.0, 0.0, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": anns,
                      "categories": [{"id": k, "name": n} for n, k in cats.items()]}
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(results), "segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    false = found = n_truth = 0
    for e in ev.evalImgs:
        if e is None or e["aRng"] != ev.params.areaRng[0]:
            continue
        false += int(((e["dtMatches"][0] == 0) & ~e["dtIgnore"][0]).sum())
        kept = ~np.asarray(e["gtIgnore"], bool)
        n_truth += int(kept.sum())
        found += int(((e["gtMatches"][0] > 0) & kept).sum())
    return Score(float(ev.stats[0]), float(ev.stats[1]), found / max(n_truth, 1), false / len(dets))


# ------------------------------------------------------------------------------------------ run
def calibrated_thresholds(engine: Engine, scenes: Sequence[Scene], proposals: Sequence[Proposals],
                          caches: Sequence[UpsampledMasks], bank: MemoryBank,
                          variants: dict[str, MethodOptions]) -> dict[str, dict[str, float]]:
    """Per variant and class: backend.quality's calibrated threshold (best F1) on these annotated
    images with the whole bank (their own groups hold no references), else the default 0.5."""
    tasks = [AnnotatedTask(i, s.image.shape[:2], tuple(TruthRegion(label, mask=m) for label, m in s.truth),
                           frozenset({f"calibration-{i}"})) for i, s in enumerate(scenes)]

    def match(i: int, task_bank: MemoryBank, options: MethodOptions) -> Detections:
        return engine.match(proposals[i], task_bank, score_threshold=0.0, masks=caches[i], options=options)

    result = evaluate_project(tasks, bank, match, {"ntt": variants["soft"], **variants})
    return {name: {label: threshold_in_force(0.5, row["calibrated_threshold"])[0]
                   for label, row in result["variants"][name]["classes"].items()}
            for name in variants}


def correction_round(engine: Engine, scenes: Sequence[Scene], dets: Sequence[Detections],
                     thresholds: dict[str, float], bank: MemoryBank) -> tuple[MemoryBank, dict[str, int]]:
    """A copy of `bank` with the negatives that correcting these predictions (kept at `thresholds`)
    to the truth makes; and their count by what they cover (_negative_kind)."""
    out = MemoryBank.from_bytes(bank.to_bytes())
    kinds = {"decoy": 0, "object": 0, "background": 0}
    for i, (scene, det) in enumerate(zip(scenes, dets)):
        kept = [d for d in range(len(det)) if det.scores[d] >= thresholds[det.labels[d]]]
        predicted = [Region(det.labels[d], mask=det.mask(d)) for d in kept]
        annotated = [Region(label, mask=m) for label, m in scene.truth]
        negatives = find_negatives(predicted, annotated, scene.image.shape[:2])
        descriptors = engine.encode_references(scene.image, masks=[predicted[n.index].mask for n in negatives])
        for n, desc in zip(negatives, descriptors):
            if desc is not None:
                out.add_negative(n.label, f"neg-{i}-{n.index}", desc, f"correction-{i}")
                kinds[_negative_kind(predicted[n.index].mask, scene)] += 1
    return out, kinds


def _negative_kind(mask: np.ndarray, scene: Scene) -> str:
    """What a false region covers most: a decoy, an annotated object (a part, a merge, a
    duplicate or a wrong label), or background."""
    best, kind = 0.5 * mask.sum(), "background"
    for label, m in scene.objects:
        inside = (mask & m).sum()
        if inside > best:
            best, kind = inside, "decoy" if label == DECOY else "object"
    return kind


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=60, help="scenes in all")
    ap.add_argument("--references", type=int, default=4, help="annotated reference images")
    ap.add_argument("--calibration", type=int, default=12, help="annotated calibration / correction images")
    ap.add_argument("--image-size", default="192x256", help="HxW")
    ap.add_argument("--sam-image-size", type=int, default=256)
    ap.add_argument("--dino-image-size", type=int, default=224)
    ap.add_argument("--blobs", type=int, default=4, help="background blob proposals per image")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--quick", action="store_true", help="16 images (3 references, 5 calibration), DINOv2 at 112")
    args = ap.parse_args(argv)
    if args.quick:
        args.images, args.references, args.calibration, args.dino_image_size = 16, 3, 5, 112
    if args.images - args.references - args.calibration < 1:
        ap.error("--images must leave at least one test image after --references and --calibration")
    torch.set_num_threads(args.threads)
    size = tuple(int(v) for v in args.image_size.split("x"))
    started = time.perf_counter()

    opts = MethodOptions(sam_image_size=args.sam_image_size, dino_image_size=args.dino_image_size,
                         points_per_side=1, compile_decoder=False)
    engine = Engine(EngineConfig("sam2.1-t", "dinov2-s", random_weights=True, device="cpu", options=opts))
    redraw_dino(engine.dino, args.seed)
    scenes = [make_scene(args.seed * 100_003 + i, size, every_class=i < args.references) for i in range(args.images)]
    refs = scenes[:args.references]
    cal = scenes[args.references:args.references + args.calibration]
    test = scenes[args.references + args.calibration:]

    bank, described = MemoryBank(), []
    for i, scene in enumerate(refs):
        descs = engine.encode_references(scene.image, masks=[m for _, m in scene.objects])
        for j, ((label, _), desc) in enumerate(zip(scene.objects, descs)):
            if desc is None:
                continue
            described.append((label, desc))
            if label != DECOY:
                bank.add(label, f"ref-{i}-{j}", desc, f"reference-{i}")
    within, within_min, cross, cross_max = cosine_summary(described)

    proposals = [propose(engine, s, args.seed * 7_919 + i, args.blobs) for i, s in enumerate(scenes)]
    caches = [UpsampledMasks(p.checksum()) for p in proposals]
    variants = {name: replace(opts, merge=name) for name in ("soft", "graph", "graph-normalised")}
    n_ref = args.references
    cal_props, cal_caches = proposals[n_ref:n_ref + len(cal)], caches[n_ref:n_ref + len(cal)]
    test_props, test_caches = proposals[n_ref + len(cal):], caches[n_ref + len(cal):]
    thresholds = calibrated_thresholds(engine, cal, cal_props, cal_caches, bank, variants)

    cal_dets = [engine.match(p, bank, score_threshold=0.0, masks=c, options=variants["soft"])
                for p, c in zip(cal_props, cal_caches)]
    corrected, neg_kinds = correction_round(engine, cal, cal_dets, thresholds["soft"], bank)

    truths = [s.truth for s in test]
    rows: list[tuple[str, str, Score]] = []

    def run(name: str, options: MethodOptions, match_bank: MemoryBank, settings: list[tuple[str, object]]) -> None:
        dets = [engine.match(p, match_bank, score_threshold=0.0, masks=c, options=options)
                for p, c in zip(test_props, test_caches)]
        for label, threshold in settings:
            rows.append((name, label, score(truths, dets, threshold)))

    for name, options in variants.items():
        title = {"soft": "soft merge (the method)", "graph": "graph diffusion",
                 "graph-normalised": "graph diffusion, normalised"}[name]
        run(title, options, bank, [("none (all, K=100)", 0.0), ("fixed 0.5", 0.5),
                                   ("calibrated", thresholds[name])])
    for negatives in ("suppress", "suppress-nearest"):
        run(f"soft + negatives {negatives}", replace(variants["soft"], negatives=negatives), corrected,
            [("fixed 0.5", 0.5), ("calibrated (soft's)", thresholds["soft"])])

    n_objects = sum(len(s.truth) for s in test)
    n_decoys = sum(label == DECOY for s in test for label, _ in s.objects)
    print(f"scenes: {args.images} images {size[0]}x{size[1]} (seed {args.seed}): {len(refs)} references "
          f"({len(bank)} reference regions), {len(cal)} calibration + correction, {len(test)} test "
          f"({n_objects} annotated objects, {n_decoys} decoys)")
    print(f"models: SAM2 @ {args.sam_image_size} replaced by injected decoder output, DINOv2-S @ "
          f"{args.dino_image_size}, random weights re-drawn (seed {args.seed})")
    print(f"reference descriptors ({len(described)}, decoys included): cosine within a class mean {within:.3f} "
          f"(min {within_min:.3f}), across classes mean {cross:.3f} (max {cross_max:.3f})")
    print(f"proposals per image: mean {np.mean([len(p) for p in proposals]):.1f}")
    print("calibrated thresholds (best F1 on the calibration images; 0.5 where a class has too little evidence):")
    for name, per_class in thresholds.items():
        print(f"  {name:<18}" + "  ".join(f"{label} {per_class[label]:.3f}" for label in CLASSES if label in per_class))
    print(f"correction round: {sum(neg_kinds.values())} negatives from the calibration images' predictions "
          f"at the soft merge's calibrated thresholds (mostly covering: {neg_kinds['decoy']} a decoy, "
          f"{neg_kinds['object']} an annotated object, {neg_kinds['background']} background)")
    print()
    print(f"{'variant':<34}{'threshold':<22}{'AP':>7}{'AP50':>7}{'recall':>8}{'false/img':>11}")
    for name, label, s in rows:
        print(f"{name:<34}{label:<22}{s.ap:>7.3f}{s.ap50:>7.3f}{s.recall:>8.3f}{s.false_per_image:>11.2f}")
    print(f"\ntotal {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
