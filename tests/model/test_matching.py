"""Matching (docs/method.md, "Matching") on hand-made proposals; lazy top-K against the eager oracle and an
independent brute-force re-implementation."""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sam2.utils.amg import batched_mask_to_box
from torchvision.ops import batched_nms

from model.bank import MemoryBank
from model.engine import Engine, EngineConfig
from model.mask_crops import merge_size, upsample_mask_crops, upsample_window
from model.matching import match, match_with_stats
from model.options import MethodOptions
from model.types import Detections, Proposals
from model.upsampled import UpsampledMasks

LOW = 64
D = 8
OPTS = MethodOptions()
EAGER = replace(OPTS, lazy_topk=False)


def unit(*v: float) -> torch.Tensor:
    x = torch.zeros(D)
    x[:len(v)] = torch.tensor(v, dtype=torch.float32)
    return x / x.norm()


def square(x0: int, y0: int, x1: int, y1: int) -> torch.Tensor:
    """Hard ±5 logits of an inclusive pixel rectangle."""
    t = torch.full((LOW, LOW), -5.0)
    t[y0:y1 + 1, x0:x1 + 1] = 5.0
    return t


def blob(cx: float, cy: float, rx: float, ry: float) -> torch.Tensor:
    """Smooth ellipse logits in [-5, 5] (many near-zero values at the boundary)."""
    y, x = torch.meshgrid(torch.arange(LOW) + 0.5, torch.arange(LOW) + 0.5, indexing="ij")
    d = torch.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
    return ((1 - d) * 2.5 * min(rx, ry)).clamp(-5, 5)


def props(logits: list[torch.Tensor], ious: list[float], descs: list[torch.Tensor],
          size: tuple[int, int] = (LOW, LOW)) -> Proposals:
    return Proposals(torch.stack(logits), torch.tensor(ious, dtype=torch.float32),
                     torch.stack(descs), size)


def cat_dog_bank() -> MemoryBank:
    bank = MemoryBank()
    bank.add("cat", "c1", unit(1).numpy())
    bank.add("dog", "d1", unit(0, 1).numpy())
    return bank


def full_mask(x0, y0, x1, y1, size=(LOW, LOW)) -> np.ndarray:
    m = np.zeros(size, bool)
    m[y0:y1 + 1, x0:x1 + 1] = True
    return m


# ---------------------------------------------------------------------------------- hand-made cases
def test_scores_labels_and_dropping_non_positive():
    p = props([square(0, 0, 9, 9), square(20, 0, 29, 9), square(40, 0, 49, 9), square(0, 20, 9, 29),
               square(20, 20, 29, 29)], [0.9, 0.8, 0.7, 0.6, 0.5],
              [unit(0.6, 0.8), unit(0.96, -0.28), unit(-0.6, -0.8), unit(0.5, 0.5, math.sqrt(0.5)),
               unit(0, 0, 1)])
    det = match(p, cat_dog_bank(), OPTS)
    # cosines: dog 0.8; cat 0.96; all <= 0 (dropped); tie 0.5/0.5 -> first class; 0 (dropped)
    assert det.labels == ["cat", "dog", "cat"]
    assert np.allclose(det.scores, [0.96, 0.8, 0.5], atol=1e-6) and det.scores.dtype == np.float32
    assert det.boxes.tolist() == [[20, 0, 29, 9], [0, 0, 9, 9], [0, 20, 9, 29]]   # inclusive xyxy
    assert np.array_equal(det.mask(1), full_mask(0, 0, 9, 9))


def test_nms_ranks_by_sam_iou_not_by_semantic_score():
    a, b = square(10, 10, 29, 29), square(11, 10, 29, 30)          # box IoU ~0.9, same class
    det = match(props([a, b], [0.9, 0.8], [unit(0.6, 0, 0.8), unit(0.9, 0, math.sqrt(0.19))]),
                cat_dog_bank(), OPTS)
    assert det.labels == ["cat"] and np.allclose(det.scores, [0.6])   # semantic ranking would keep 0.9
    assert det.boxes.tolist() == [[10, 10, 29, 29]]
    det = match(props([a, b], [0.8, 0.9], [unit(0.6, 0, 0.8), unit(0.9, 0, math.sqrt(0.19))]),
                cat_dog_bank(), OPTS)
    assert np.allclose(det.scores, [0.9]) and det.boxes.tolist() == [[11, 10, 29, 30]]


def test_nms_is_class_aware():
    a = square(10, 10, 29, 29)
    det = match(props([a, a.clone()], [0.9, 0.8], [unit(0.9, 0.1), unit(0.1, 0.7)]), cat_dog_bank(), OPTS)
    assert sorted(det.labels) == ["cat", "dog"]
    assert np.array_equal(det.mask(0), det.mask(1))
    assert np.allclose(sorted(det.scores), [0.7 / math.sqrt(0.5), 0.9 / math.sqrt(0.82)])


def test_soft_merge_partial_overlap_by_hand():
    whole = square(10, 10, 39, 39)          # 900 px, score 1 (cat)
    part = square(30, 5, 39, 14)            # 100 px, 50 of them inside whole; cos(part, whole) = 0.8
    p = props([whole, part], [0.95, 0.7], [unit(1), unit(0.8, 0.6)])
    det = match(p, cat_dog_bank(), OPTS)
    assert det.labels == ["cat", "cat"]
    assert np.allclose(det.scores, [1.0, 0.8 * math.sqrt(1 - 0.5 * 0.8)], atol=1e-6)
    det = match(p, cat_dog_bank(), replace(OPTS, merge_exponent=1.0))
    assert np.allclose(det.scores, [1.0, 0.8 * (1 - 0.4)], atol=1e-6)
    # rank by SAM IoU decides who decays: part first -> whole decays by IoS = 50/900 * 0.8
    det = match(props([whole, part], [0.7, 0.95], [unit(1), unit(0.8, 0.6)]), cat_dog_bank(), OPTS)
    assert np.allclose(det.scores, [math.sqrt(1 - 50 / 900 * 0.8), 0.8], atol=1e-6)
    assert det.boxes.tolist() == [[10, 10, 39, 39], [30, 5, 39, 14]]


def test_soft_merge_nested_part_needs_same_class_and_positive_similarity():
    whole, part = square(10, 10, 39, 39), square(15, 15, 24, 24)     # part fully inside
    det = match(props([whole, part], [0.95, 0.7], [unit(1), unit(0.8, 0.6)]), cat_dog_bank(), OPTS)
    assert np.allclose(det.scores, [1.0, 0.8 * math.sqrt(1 - 0.8)], atol=1e-6)   # IoS = 1 * cos
    det = match(props([whole, part], [0.95, 0.7], [unit(1), unit(0.6, 0.8)]), cat_dog_bank(), OPTS)
    assert det.labels == ["cat", "dog"] and np.allclose(det.scores, [1.0, 0.8])  # other class: no decay
    det = match(props([whole, part], [0.95, 0.7], [unit(1, 0, 2), unit(1, 0, -2)]), cat_dog_bank(), OPTS)
    assert np.allclose(det.scores, [1 / math.sqrt(5)] * 2)                        # cos = -0.6: no decay


def separate_squares(scores: list[float], ious: list[float]) -> Proposals:
    logits = [square(12 * (i % 5), 12 * (i // 5), 12 * (i % 5) + 9, 12 * (i // 5) + 9)
              for i in range(len(scores))]
    return props(logits, ious, [unit(s, math.sqrt(1 - s * s)) for s in scores])


def cat_bank() -> MemoryBank:
    bank = MemoryBank()
    bank.add("cat", "c1", unit(1).numpy())
    return bank


@pytest.mark.parametrize("opts", [OPTS, EAGER])
def test_pre_merge_cap_top_k_and_threshold(opts):
    p = separate_squares([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [0.9, 0.8, 0.7, 0.6, 0.5, 0.45])
    capped = match(p, cat_bank(), replace(opts, pre_merge_factor=2), max_detections=2)
    assert np.allclose(capped.scores, [0.4, 0.3])             # only the first 4 by SAM IoU compete
    det = match(p, cat_bank(), opts, max_detections=3)
    assert np.allclose(det.scores, [0.6, 0.5, 0.4])
    assert det.boxes[:, :2].tolist() == [[0, 12], [48, 0], [36, 0]]   # the squares of those scores
    thr = float(det.scores[2])                                # the float32 0.4 itself
    det = match(p, cat_bank(), opts, score_threshold=thr)
    assert np.allclose(det.scores, [0.6, 0.5, 0.4])           # score >= threshold is kept
    det = match(p, cat_bank(), replace(opts, score_threshold=0.45))
    assert np.allclose(det.scores, [0.6, 0.5])
    assert len(match(p, cat_bank(), opts, max_detections=0)) == 0


def test_kept_empty_masks_hold_pre_merge_cap_slots_as_in_the_reference():
    """drop_empty_masks=False keeps empty SAM2 masks (zero descriptor, box [0, 0, 0, 0]): they pass
    NMS, take pre-merge cap slots by their SAM IoU, then fail score > 0, as in the reference."""
    logits = [square(12 * i, 0, 12 * i + 9, 9) for i in range(3)]
    empty = torch.full((LOW, LOW), -5.0)
    descs = [unit(0.9, math.sqrt(1 - 0.81)), unit(0.8, 0.6), unit(0.7, math.sqrt(1 - 0.49))]
    reference = props([logits[0], empty, logits[1], logits[2]], [0.9, 0.85, 0.8, 0.7],
                      [descs[0], torch.zeros(D), descs[1], descs[2]])
    dropped = props(logits, [0.9, 0.8, 0.7], descs)
    cap = replace(OPTS, pre_merge_factor=1)
    assert np.allclose(match(dropped, cat_bank(), cap, max_detections=3).scores, [0.9, 0.8, 0.7])
    assert np.allclose(match(reference, cat_bank(), cap, max_detections=3).scores, [0.9, 0.8])


def test_empty_inputs_give_empty_detections():
    p = separate_squares([0.5], [0.9])
    for det in (match(p, MemoryBank(), OPTS),
                match(Proposals(torch.zeros(0, LOW, LOW), torch.zeros(0), torch.zeros(0, D), (30, 40)),
                      cat_bank(), OPTS),
                match(separate_squares([0.0], [0.9]), cat_bank(), OPTS)):
        assert len(det) == 0 and det.boxes.shape == (0, 4) and det.scores.shape == (0,)
    assert match(p, MemoryBank(), OPTS).image_size == (LOW, LOW)


def test_nan_descriptor_is_dropped_and_dimension_mismatch_raises():
    p = separate_squares([0.5, 0.7], [0.9, 0.8])
    p.descriptors[0] = float("nan")
    det = match(p, cat_bank(), OPTS)
    assert np.allclose(det.scores, [0.7]) and np.isfinite(det.boxes).all()
    bank = MemoryBank()
    bank.add("cat", "c1", np.ones(D + 1, np.float32))
    with pytest.raises(ValueError, match="dimension"):
        match(p, bank, OPTS)


def test_empty_full_resolution_mask_is_dropped():
    dot = torch.full((LOW, LOW), -5.0)
    dot[30, 30] = 0.5                       # positive at low res, vanishes when downsampled 64 -> 8
    p = props([dot, blob(16, 16, 14, 14)], [0.9, 0.8], [unit(1), unit(0.9, 0.4)], size=(8, 8))
    det = match(p, cat_bank(), OPTS)
    assert len(det) == 1 and np.allclose(det.scores, [0.9 / math.sqrt(0.97)])


def test_upsampling_is_independent_of_chunking():
    logits = torch.stack([blob(10 + 3 * i, 20, 4 + i, 6) for i in range(7)])
    one = upsample_mask_crops(logits, (97, 131), max_pixels=1)
    many = upsample_mask_crops(logits, (97, 131))
    ref = F.interpolate(logits[:, None], (97, 131), mode="bilinear", align_corners=False,
                        antialias=True)[:, 0] > 0
    boxes = np.array([[x, y, x + m.shape[1] - 1, y + m.shape[0] - 1] for x, y, m in many])
    boxed = upsample_mask_crops(logits, (97, 131), within=(boxes + [-2, -1, 3, 1]).clip(0, 96))
    for (x, y, m), (x2, y2, m2), (x3, y3, m3), full in zip(one, many, boxed, ref.numpy()):
        assert (x, y) == (x2, y2) == (x3, y3) and np.array_equal(m, m2) and np.array_equal(m, m3)
        rebuilt = np.zeros_like(full)
        rebuilt[y:y + m.shape[0], x:x + m.shape[1]] = m
        assert np.array_equal(rebuilt, full) and m[0].any() and m[:, 0].any() and m[-1].any()


# ---------------------------------------------------------------------------------- oracle comparisons
def random_scene(seed: int, n: int = 70, classes: int = 4,
                 size: tuple[int, int] = (LOW, LOW)) -> tuple[Proposals, MemoryBank]:
    """Many overlapping smooth blobs (parts inside wholes), several classes, noisy descriptors."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.rand(*s, generator=g)          # noqa: E731
    protos = F.normalize(torch.randn(classes, D, generator=g), dim=1) + 0.5
    bank = MemoryBank()
    for c in range(classes):
        for k in range(1 + c % 3):
            bank.add(f"class{c}", f"{c}-{k}", (protos[c] + 0.3 * torch.randn(D, generator=g)).numpy())
    logits, descs, cls, params = [], [], [], []
    for i in range(n):
        if i and r(1) < 0.4:                                # a part of an earlier blob
            j = int(r(1) * len(logits))
            cx, cy, rx, ry = params[j]
            params_i = (cx + (r(1).item() - 0.5) * rx, cy + (r(1).item() - 0.5) * ry,
                        rx * (0.3 + 0.5 * r(1).item()), ry * (0.3 + 0.5 * r(1).item()))
            c = cls[j] if r(1) < 0.8 else int(r(1) * classes)
        else:
            params_i = (r(1).item() * LOW, r(1).item() * LOW, 2 + r(1).item() * 16, 2 + r(1).item() * 16)
            c = int(r(1) * classes)
        params.append(params_i)
        logits.append(blob(*params_i))
        cls.append(c)
        descs.append(F.normalize(protos[c] + 0.6 * torch.randn(D, generator=g), dim=0))
    iou = 0.4 + 0.6 * r(n)
    return Proposals(torch.stack(logits), iou, torch.stack(descs), size), bank


def brute_force(p: Proposals, bank: MemoryBank, opts: MethodOptions, k: int, thr: float):
    """Straight transcription of the method (docs/method.md, "Matching") with full masks and float64 maths."""
    names, P = bank.prototypes()
    s = (p.descriptors @ P.T).clamp(min=0)
    lab, sc = s.argmax(1), s.max(1).values
    keep = batched_nms(batched_mask_to_box(p.logits > 0).float(), p.iou, lab, opts.nms_threshold)
    keep = keep[:opts.pre_merge_factor * k]
    keep = keep[sc[keep] > 0]
    msize = merge_size(p.image_size, opts.merge_max_side)
    up = lambda size: (F.interpolate(p.logits[keep][:, None], size, mode="bilinear",   # noqa: E731
                                     align_corners=False, antialias=True)[:, 0] > 0)
    M, out = up(msize).flatten(1).double(), up(p.image_size)
    inter, area = M @ M.T, M.sum(1)
    f = p.descriptors[keep].double()
    pair = ((lab[keep][:, None] == lab[keep][None]) & torch.ones(len(keep), len(keep)).tril(-1).bool())
    ios = (inter / area[:, None] * (f @ f.T).clamp(min=0) * pair).nan_to_num().amax(1) if len(keep) else area
    dec = sc[keep].double() * (1 - ios.clamp(max=1)) ** opts.merge_exponent
    valid = [i for i in range(len(keep)) if area[i] > 0 and out[i].any()]
    order = sorted(valid, key=lambda i: (-dec[i].item(), i))[:k]
    order = [i for i in order if dec[i] > 0 and (thr <= 0 or dec[i] >= thr)]
    return [names[lab[keep[i]]] for i in order], dec[order].numpy(), out[order].numpy()


def assert_same(a: Detections, b: Detections) -> None:
    assert a.labels == b.labels and a.image_size == b.image_size
    assert np.array_equal(a.scores, b.scores) and np.array_equal(a.boxes, b.boxes)
    for (x, y, m), (x2, y2, m2) in zip(a.masks, b.masks):
        assert (x, y) == (x2, y2) and np.array_equal(m, m2)


def assert_matches_brute_force(det: Detections, p, bank, opts, k, thr) -> None:
    labels, scores, masks = brute_force(p, bank, opts, k, thr)
    assert det.labels == labels
    assert np.allclose(det.scores, scores, rtol=1e-6, atol=1e-7)
    for i, m in enumerate(masks):
        assert np.array_equal(det.mask(i), m)
        ys, xs = np.nonzero(m)
        assert det.boxes[i].tolist() == [xs.min(), ys.min(), xs.max(), ys.max()]


CASES = [  # (seed, image size, K, threshold, merge_max_side)
    (0, (LOW, LOW), 3, 0.0, 0), (1, (97, 131), 5, 0.0, 0), (2, (40, 50), 4, 0.0, 0),
    (3, (200, 150), 3, 0.3, 0), (4, (97, 131), 100, 0.0, 0), (5, (180, 240), 5, 0.0, 60),
    (6, (23, 17), 3, 0.0, 0), (7, (128, 128), 5, 0.5, 0),
]


@pytest.mark.parametrize("seed,size,k,thr,max_side", CASES)
def test_lazy_top_k_is_exact(seed, size, k, thr, max_side):
    p, bank = random_scene(seed, size=size)
    opts = replace(OPTS, merge_max_side=max_side)
    lazy, s_lazy = match_with_stats(p, bank, opts, score_threshold=thr, max_detections=k)
    eager, s_eager = match_with_stats(p, bank, replace(opts, lazy_topk=False), score_threshold=thr,
                                      max_detections=k)
    assert len(eager) > 0
    assert_same(lazy, eager)
    assert_matches_brute_force(eager, p, bank, opts, k, thr)
    assert s_eager.upsampled == s_eager.candidates * (1 if merge_size(size, max_side) == size else 2)
    if k < 10:
        assert s_lazy.upsampled < s_eager.upsampled
    print(f"seed {seed} {size} K={k}: {s_lazy.upsampled}/{s_eager.upsampled} masks upsampled "
          f"({s_lazy.candidates} candidates)")


def test_lazy_prunes_a_lot_on_a_crowded_scene():
    p, bank = random_scene(11, n=300, classes=6, size=(300, 400))
    lazy, s_lazy = match_with_stats(p, bank, OPTS, max_detections=5)
    eager, s_eager = match_with_stats(p, bank, EAGER, max_detections=5)
    assert_same(lazy, eager)
    assert s_eager.candidates == 40 and s_lazy.upsampled <= s_eager.upsampled // 2


def test_proposals_round_trip_gives_identical_detections():
    for size in ((97, 131), (40, 50)):
        p, bank = random_scene(21, size=size)
        again = Proposals.from_bytes(p.to_bytes())
        assert not torch.equal(again.logits, p.logits)        # interior values really were dropped
        assert_same(match(again, bank, OPTS, max_detections=5), match(p, bank, OPTS, max_detections=5))
        assert_same(match(again, bank, EAGER), match(p, bank, EAGER))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    p, bank = random_scene(31, size=(480, 640))
    cpu = match(p, bank, OPTS, max_detections=5)
    gpu = match(p.to("cuda"), bank, OPTS, max_detections=5)
    assert gpu.labels == cpu.labels and np.allclose(gpu.scores, cpu.scores, atol=1e-5)
    assert_same(gpu, match(p.to("cuda"), bank, EAGER, max_detections=5))


@pytest.mark.parametrize("low,size", [((64, 64), (97, 131)), ((64, 64), (300, 41)), ((64, 64), (23, 17)),
                                      ((64, 64), (64, 64)), ((32, 48), (1, 200)), ((64, 64), (2, 3))])
def test_windowed_upsampling_is_bit_identical_to_the_full_one(low, size):
    """The CPU window path must give the very same float values as cropping the full resize,
    for noise logits (every value near a sign change), windows of any size, at every border."""
    g = torch.Generator().manual_seed(sum(size))
    logits = torch.randn(3, *low, generator=g) * 3
    full = F.interpolate(logits[:, None], size, mode="bilinear", align_corners=False, antialias=True)[:, 0]
    H, W = size
    windows = [(0, 0, W - 1, H - 1), (W - 1, H - 1, W - 1, H - 1), (0, 0, 0, 0), (W // 2, 0, W - 1, H // 2)]
    for _ in range(12):
        x0, y0 = int(torch.randint(W, (1,), generator=g)), int(torch.randint(H, (1,), generator=g))
        windows.append((x0, y0, min(W - 1, x0 + int(torch.randint(8, (1,), generator=g))),
                        min(H - 1, y0 + int(torch.randint(40, (1,), generator=g)))))
    for k in range(logits.shape[0]):
        for x0, y0, x1, y1 in windows:
            got = upsample_window(logits[k], size, x0, y0, x1, y1)
            assert torch.equal(got, full[k, y0:y1 + 1, x0:x1 + 1]), (k, x0, y0, x1, y1)
    within = np.array([windows[-1]] * 3)
    crops = upsample_mask_crops(logits, size, within=within)
    for (x, y, m), ref in zip(crops, full > 0):
        x0, y0, x1, y1 = windows[-1]
        rebuilt = np.zeros((H, W), bool)
        rebuilt[y:y + m.shape[0], x:x + m.shape[1]] = m
        assert np.array_equal(rebuilt[y0:y1 + 1, x0:x1 + 1], ref[y0:y1 + 1, x0:x1 + 1].numpy())


def state(obj: object) -> object:
    """Everything an object holds, as comparable values: tensors and arrays by dtype, shape and
    bytes, objects with to_bytes by those, other objects by their attributes (recursively)."""
    if isinstance(obj, torch.Tensor):
        return "tensor", str(obj.dtype), tuple(obj.shape), obj.detach().cpu().contiguous().numpy().tobytes()
    if isinstance(obj, np.ndarray):
        return "array", str(obj.dtype), obj.shape, obj.flags.writeable, obj.tobytes()
    if hasattr(obj, "to_bytes"):
        return type(obj).__name__, obj.to_bytes()
    if isinstance(obj, dict):
        return {k: state(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [state(v) for v in obj]
    if hasattr(obj, "__dict__"):
        return type(obj).__name__, {k: state(v) for k, v in vars(obj).items() if not k.startswith("_lock")}
    return repr(obj)


def snapshot(p: Proposals) -> object:
    return state(p), state(vars(p)), p.to_bytes()


@pytest.fixture(scope="module")
def engine() -> Engine:
    """A real Engine (random tiny models: match uses only its device and options)."""
    return Engine(EngineConfig(sam_model="sam2.1-t", dino_model="dinov2-s", random_weights=True, device="cpu",
                               options=MethodOptions(sam_image_size=256, dino_image_size=112)))


@pytest.mark.parametrize("packed", [False, True])
def test_engine_match_leaves_its_inputs_bit_identical(engine, packed):
    """Proposals, bank and the caller's mask cache are read, never written: the same bytes, the
    same attributes after a match (a cold one, one reading the cache, one with another bank)."""
    p, bank = random_scene(51, n=80, classes=3, size=(150, 200))
    if packed:
        p = Proposals.from_bytes(p.to_bytes())
    masks = UpsampledMasks(p.checksum())
    masks.update(engine.match_full(p, bank, max_detections=5).upsampled)
    assert len(masks) > 0
    other = MemoryBank()
    other.add("c0", "extra", p.descriptors[3].numpy())
    before = snapshot(p), state(bank), bank.version, state(other), state(masks)
    for b in (bank, other):
        engine.match(p, b)
        engine.match(p, b, masks=masks)
        engine.match_full(p, b, score_threshold=0.3, masks=masks)
    assert (snapshot(p), state(bank), bank.version, state(other), state(masks)) == before


def test_matches_with_and_without_a_mask_cache_give_identical_detections(engine):
    """The caller's cache saves upsampling, never changes the result: for the bank that filled it,
    a changed bank, the eager reference order and after a to_bytes round trip of the cache."""
    p, bank = random_scene(41, n=120, classes=4, size=(150, 200))
    first = engine.match_full(p, bank, max_detections=10)
    assert first.stats.upsampled > 0 and len(first.upsampled) == first.stats.upsampled
    masks = UpsampledMasks(p.checksum())
    assert masks.update(first.upsampled) == len(first.upsampled) and masks.update(first.upsampled) == 0
    again = engine.match_full(p, bank, max_detections=10, masks=masks)
    assert again.stats.upsampled == 0 and len(again.upsampled) == 0 and again.stats.evaluated == first.stats.evaluated
    assert_same(again.detections, first.detections)
    other = MemoryBank()
    for name in bank.classes[1:]:                                   # one class fewer: other candidates
        for ref in bank.refs(name):
            other.add(ref.class_name, ref.ref_id, ref.descriptor)
    changed = engine.match_full(p, other, max_detections=10, masks=masks)
    bare = engine.match_full(p, other, max_detections=10)
    assert_same(changed.detections, bare.detections)
    assert changed.stats.upsampled < bare.stats.upsampled
    assert set(changed.upsampled.keys()).isdisjoint(masks.keys())  # only what the cache lacked
    assert_same(match(p, other, EAGER, max_detections=10, masks=masks), bare.detections)
    restored = UpsampledMasks.from_bytes(masks.to_bytes())
    assert restored.owner == masks.owner and restored.keys() == masks.keys()
    for i, H, W in masks.keys():
        (x, y, m), (x2, y2, m2) = masks.get(i, (H, W)), restored.get(i, (H, W))
        assert (x, y) == (x2, y2) and m.dtype == m2.dtype == bool and np.array_equal(m, m2)
    assert_same(engine.match(Proposals.from_bytes(p.to_bytes()), other, max_detections=10, masks=restored),
                bare.detections)


def test_a_mask_cache_of_other_proposals_is_refused(engine):
    p, bank = random_scene(41, n=40, classes=2, size=(60, 80))
    q, _ = random_scene(42, n=40, classes=2, size=(60, 80))
    assert p.checksum() == Proposals.from_bytes(p.to_bytes()).checksum() == p.to("cpu").checksum()
    assert p.checksum() != q.checksum()
    with pytest.raises(ValueError, match="other proposals"):
        engine.match(p, bank, masks=UpsampledMasks(q.checksum()))
    with pytest.raises(ValueError, match="other proposals"):
        UpsampledMasks(p.checksum()).update(UpsampledMasks(q.checksum()))


def test_match_pool_runs_torch_single_threaded_and_restores_the_setting():
    """Re-score threads must not each start an intra-op team (oversubscription), and threads created
    after the pool must get the process's setting back."""
    import threading

    from model.engine import match_pool

    outer = torch.get_num_threads()
    torch.set_num_threads(3)  # whatever the machine: a setting the pool must not leak or keep
    before = torch.get_num_threads()
    p, bank = random_scene(51, size=(97, 131))
    with match_pool(2) as pool:
        seen = list(pool.map(lambda q: (torch.get_num_threads(), len(match(q, bank, OPTS))),
                             [p, p]))
    assert [s[0] for s in seen] == [1, 1] and seen[0][1] == seen[1][1] == len(match(p, bank, OPTS)) > 0
    later: list[int] = []
    t = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
    t.start()
    t.join()
    main_after = torch.get_num_threads()
    torch.set_num_threads(outer)
    assert before == main_after == 3 and later == [3]
