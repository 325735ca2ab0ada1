"""Matching proposals against the memory bank (docs/method.md, "Matching").

Steps, as the reference does them:
  1. s[i, c] = max(0, f_i · p_c); label = argmax, score = max.
  2. Class-aware box NMS on the low-res masks ranked by SAM's predicted IoU, keep the first
     pre_merge_factor × K survivors, drop score <= 0.
  3. Full-resolution masks: bilinear (antialias, align_corners=False) upsampling of the logits,
     > 0 — done only in `upsample_mask_crops`.
  4. Soft merging in NMS order: IoS(i) = max_{j before i, same label} |M_i ∩ M_j| / |M_i| ·
     max(0, f_i · f_j); score_i *= (1 - IoS(i)) ** merge_exponent.
  5. Sort by decayed score (stable, ties keep NMS order), top K, then the score threshold.

Named variants (docs/method.md, "Variants"), off by default: opts.negatives removes a class from a
proposal's step-1 scores where a stored negative of that class is nearer than the class itself
(`_suppress_negatives`); opts.merge = "graph" / "graph-normalised" replaces step 4 by FSOD-VFM's
graph diffusion on masks at the DINOv2 feature grid (model.graph_diffusion, `_GraphMerge`).

A match is pure: it reads the proposals, the bank and the caller's mask cache (`masks`, a
model.upsampled.UpsampledMasks of these proposals) and changes none of them; the masks it had to
upsample come back in MatchResult.upsampled for the caller to keep. Detections do not depend on
what the cache held.

Differences from the reference at degenerate inputs (docs/method.md, "Deviations"): nothing left
gives empty Detections instead of raising; a candidate whose full-resolution mask is empty is
dropped (the reference divides by |M_i| = 0 and gets NaN); IoS is clipped to 1 (unit descriptors
can have a dot product a hair above 1, which would make (1 - IoS) ** 0.5 NaN).

Lazy top-K (opts.lazy_topk, exact): the decay never raises a score, so candidates are evaluated in
descending undecayed score; once K decayed scores exist and the next undecayed score is below the
K-th best (or below the threshold), nobody left can enter the output. Evaluating candidate i needs
the high-resolution masks of i and of the earlier same-label masks j with f_i · f_j > 0 whose
conservative box (low-res box grown by the bilinear taps' reach) overlaps i's mask, and only until
the running maximum of IoS reaches the upper bound of the partners not yet seen. Masks are kept as
crops, intersections are exact integer counts, and decayed scores come from the same function in
both modes, so lazy and eager (opts.lazy_topk=False, the reference order) outputs are identical;
the MatchStats counters show the work saved.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import batched_nms

from .bank import MemoryBank
from .graph_diffusion import DINO_PATCH, diffusion_decay, feature_masks, graph_diffusion
from .options import MethodOptions
from .types import Detections, Proposals
from .upsampled import Crop, UpsampledMasks

_CHUNK_PIXELS = 1 << 25             # upsampled pixels per interpolate call (memory bound)
_MIN_ROUND = 8                      # lazy mode: fewest candidates evaluated per upsampling round
_PARTNER_GROUP = 8                  # partner masks upsampled together while computing one IoS


@dataclass
class MatchStats:
    """Work done by one match call (the lazy path is judged by `upsampled`)."""

    proposals: int = 0
    candidates: int = 0   # after NMS, cap and score > 0
    evaluated: int = 0    # candidates whose decayed score was computed
    upsampled: int = 0    # masks upsampled (merge resolution plus output resolution if different)
    pairs: int = 0        # mask intersections counted
    suppressed: int = 0   # proposals whose best class a negative removed (opts.negatives)


def upsample_mask_crops(logits: torch.Tensor, size: tuple[int, int], within: np.ndarray | None = None,
                        max_pixels: int = _CHUNK_PIXELS) -> list[Crop]:
    """Low-res logits [n, h, w] -> masks at `size` (step 3), as tight crops on the CPU.

    The only place masks change resolution. `within`: optional [n, 4] inclusive boxes at `size`
    known to contain the masks (see _reach_boxes); thresholding and cropping then only look there,
    and on the CPU only that window is upsampled (`upsample_window`, bit-identical). Otherwise
    whole masks are upsampled in chunks so that at most `max_pixels` values exist at once; each
    mask's result does not depend on the chunking.
    """
    H, W = size
    if within is not None and logits.device.type == "cpu" and W > 1:
        return [_crop((upsample_window(logits[k], size, *within[k].tolist()) > 0).numpy(),
                      *within[k][:2].tolist()) for k in range(logits.shape[0])]
    chunk = max(1, max_pixels // (H * W))
    crops: list[Crop] = []
    for start in range(0, logits.shape[0], chunk):
        x = logits[start:start + chunk, None].float()
        up = F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False, antialias=True)[:, 0]
        for k in range(up.shape[0]):
            x0, y0, x1, y1 = (0, 0, W - 1, H - 1) if within is None else within[start + k].tolist()
            crops.append(_crop((up[k, y0:y1 + 1, x0:x1 + 1] > 0).cpu().numpy(), x0, y0))
    return crops


def _crop(m: np.ndarray, x0: int, y0: int) -> Crop:
    """Tight crop of a boolean window whose top-left pixel is (x0, y0)."""
    ys, xs = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))   # numpy's any() is much faster
    if ys.size == 0:
        return 0, 0, np.zeros((0, 0), dtype=bool)
    return x0 + int(xs[0]), y0 + int(ys[0]), m[ys[0]:ys[-1] + 1, xs[0]:xs[-1] + 1].copy()


def upsample_window(logit: torch.Tensor, size: tuple[int, int], x0: int, y0: int, x1: int,
                    y1: int) -> torch.Tensor:
    """The inclusive window [y0..y1] x [x0..x1] of the step-3 upsampling of one CPU [h, w] logit
    map to `size`, computed alone and bit-identical to cropping the full upsampling.

    PyTorch's CPU antialiased bilinear resize is separable: a horizontal pass over each row, then
    a vertical pass over each column of that result, each skipped when its size does not change.
    Rows are independent in the first pass and columns in the second, so the window is the first
    pass on the low-res rows that the window's vertical taps read, then the second pass on the
    window's columns only (other rows zero: never read). Same kernels, same weights, same sums.
    A window is widened to >= 2 columns: PyTorch takes another code path for width-1 outputs.
    """
    H, W = size
    h, w = logit.shape
    s = h / H
    support = max(s, 1.0)
    r0 = max(0, math.floor((y0 + 0.5) * s - support) - 2)
    r1 = min(h - 1, math.ceil((y1 + 0.5) * s + support) + 2)
    a0, a1 = max(0, x0 - 1), min(W - 1, x1 + 1)
    rows = F.interpolate(logit[None, None, r0:r1 + 1].float(), size=(r1 - r0 + 1, W), mode="bilinear",
                         align_corners=False, antialias=True)
    tall = rows.new_zeros(1, 1, h, a1 - a0 + 1)
    tall[..., r0:r1 + 1, :] = rows[..., a0:a1 + 1]
    up = F.interpolate(tall, size=(H, a1 - a0 + 1), mode="bilinear", align_corners=False, antialias=True)
    return up[0, 0, y0:y1 + 1, x0 - a0:x1 - a0 + 1]


def merge_size(image_size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """Resolution of the soft-merge masks: full size, or longer side = max_side (deviation)."""
    H, W = image_size
    if max_side <= 0 or max(H, W) <= max_side:
        return H, W
    s = max_side / max(H, W)
    return max(1, round(H * s)), max(1, round(W * s))


@dataclass
class MatchResult:
    """Detections, the work done, and the masks this match upsampled that `masks` lacked (an
    UpsampledMasks of the same proposals: the caller merges them into its cache, or drops them)."""

    detections: Detections
    stats: MatchStats
    upsampled: UpsampledMasks


def match(proposals: Proposals, bank: MemoryBank, opts: MethodOptions, score_threshold: float | None = None,
          max_detections: int | None = None, *, masks: UpsampledMasks | None = None) -> Detections:
    """Detections of the bank's classes among the proposals, best first (see module docstring)."""
    return match_full(proposals, bank, opts, score_threshold, max_detections, masks=masks).detections


def match_with_stats(proposals: Proposals, bank: MemoryBank, opts: MethodOptions,
                     score_threshold: float | None = None, max_detections: int | None = None, *,
                     masks: UpsampledMasks | None = None) -> tuple[Detections, MatchStats]:
    """`match` plus a record of the work done (for tests and benchmarks)."""
    result = match_full(proposals, bank, opts, score_threshold, max_detections, masks=masks)
    return result.detections, result.stats


def match_full(proposals: Proposals, bank: MemoryBank, opts: MethodOptions,
               score_threshold: float | None = None, max_detections: int | None = None, *,
               masks: UpsampledMasks | None = None) -> MatchResult:
    """`match` with its stats and newly upsampled masks. `max_detections` overrides the method's
    K (opts.max_detections), which also sets the pre-merge cap: callers that only display fewer
    detections keep K and cut the result (docs/method.md, "Deviations")."""
    owner = proposals.checksum()
    if masks is not None and masks.owner != owner:
        raise ValueError("the mask cache belongs to other proposals")
    new = UpsampledMasks(owner)
    stats = MatchStats(proposals=len(proposals))
    k = opts.max_detections if max_detections is None else max_detections
    threshold = opts.score_threshold if score_threshold is None else score_threshold
    if len(proposals) == 0 or len(bank) == 0 or k <= 0:
        return MatchResult(Detections.empty(proposals.image_size), stats, new)
    names, cand = _candidates(proposals, bank, opts, k, stats)
    stats.candidates = cand.n
    if cand.n == 0:
        return MatchResult(Detections.empty(proposals.image_size), stats, new)
    known = masks or UpsampledMasks(owner)
    if opts.merge == "soft":
        merger = _Merger(proposals, cand, opts, stats, known, new)
        records = merger.run_lazy(k, threshold) if opts.lazy_topk else merger.run_all()
    else:
        merger = _GraphMerge(proposals, cand, opts, stats, known, new)
        records = merger.run(k, threshold)
    records.sort(key=lambda t: (-t[0], t[1]))
    chosen = [(d, r) for d, r in records[:k] if d > 0 and (threshold <= 0 or d >= threshold)]
    out = [merger.output_crop(r) for _, r in chosen]
    boxes = np.array([[x, y, x + m.shape[1] - 1, y + m.shape[0] - 1] for x, y, m in out],
                     dtype=np.float32).reshape(-1, 4)
    det = Detections(image_size=tuple(proposals.image_size), boxes=boxes,
                     scores=np.array([d for d, _ in chosen], dtype=np.float32),
                     labels=[names[cand.labels[r]] for _, r in chosen], masks=out)
    return MatchResult(det, stats, new)


@dataclass
class _Candidates:
    """NMS survivors in NMS order (rank r), everything the merge needs, on the CPU."""

    index: torch.Tensor       # [n] proposal index (on the proposals' device)
    labels: np.ndarray        # [n] class index
    scores: np.ndarray        # [n] undecayed score (float32 values)
    boxes: np.ndarray         # [n, 4] inclusive low-res boxes
    sims: np.ndarray          # [n, n] f_i · f_j

    @property
    def n(self) -> int:
        return int(self.labels.shape[0])


def _candidates(proposals: Proposals, bank: MemoryBank, opts: MethodOptions,
                k: int, stats: MatchStats) -> tuple[list[str], _Candidates]:
    """Scoring (step 1) and NMS + cap + score filter (step 2)."""
    desc = proposals.descriptors.float()
    names, protos = bank.prototypes(desc.device)
    if desc.shape[1] != protos.shape[1]:
        raise ValueError(f"proposal descriptors have dimension {desc.shape[1]}, "
                         f"memory bank has {protos.shape[1]}: different DINOv2 models?")
    sims = (desc @ protos.T).clamp(min=0)                       # NaN stays NaN, dropped below
    suppressed = None
    if opts.negatives != "off":
        sims, suppressed = _suppress_negatives(desc, sims, bank, names, opts.negatives, stats)
    labels = sims.argmax(1)
    scores = sims.gather(1, labels[:, None])[:, 0]
    boxes = proposals.lowres_boxes()
    if suppressed is None:
        keep = batched_nms(boxes.float(), proposals.iou.float(), labels, opts.nms_threshold)
    else:  # a proposal that negatives left without a class takes no part in NMS
        alive = torch.nonzero(~suppressed)[:, 0]
        keep = alive[batched_nms(boxes[alive].float(), proposals.iou[alive].float(), labels[alive],
                                 opts.nms_threshold)]
    keep = keep[:opts.pre_merge_factor * k]
    keep = keep[scores[keep] > 0]
    kept = desc[keep]
    return names, _Candidates(
        index=keep, labels=labels[keep].cpu().numpy(), scores=scores[keep].double().cpu().numpy(),
        boxes=boxes[keep].long().cpu().numpy(), sims=(kept @ kept.T).double().cpu().numpy())


def _suppress_negatives(desc: torch.Tensor, sims: torch.Tensor, bank: MemoryBank, names: list[str],
                        rule: str, stats: MatchStats) -> tuple[torch.Tensor, torch.Tensor]:
    """Step-1 scores with negatives (docs/method.md, "Negatives"): s[i, c] = 0 where a negative of
    class c is more similar to f_i than c's prototype ("suppress") or than c's nearest reference
    ("suppress-nearest"); the label is then the best class left. Also returns which proposals
    this left with no class (those that had one before)."""
    owner, negs = bank.unit_descriptors(names, negatives=True, device=desc.device)
    if owner.numel() == 0:
        return sims, torch.zeros(sims.shape[0], dtype=torch.bool, device=sims.device)
    near = _classwise_max(desc @ negs.T, owner, len(names))
    if rule == "suppress-nearest":
        ref_owner, refs = bank.unit_descriptors(names, device=desc.device)
        rival = _classwise_max(desc @ refs.T, ref_owner, len(names))
    else:
        rival = sims
    beaten = near > rival
    stats.suppressed = int(beaten.gather(1, sims.argmax(1, keepdim=True)).sum())
    left = sims.masked_fill(beaten, 0.0)
    return left, (sims.amax(1) > 0) & ~(left.amax(1) > 0)


def _classwise_max(cos: torch.Tensor, owner: torch.Tensor, classes: int) -> torch.Tensor:
    """[N, C] max(0, max over the columns of each class) of cosines [N, M] whose columns belong
    to classes `owner` [M]."""
    out = cos.new_zeros(cos.shape[0], classes)
    return out.scatter_reduce(1, owner.expand(cos.shape[0], -1), cos, reduce="amax")


def _reach_boxes(boxes: np.ndarray, low: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """Inclusive boxes at `size` that surely contain the upsampled masks of low-res `boxes`.

    An output pixel reads low-res pixels within support + 1 of its centre, support = max(1, scale)
    (scale = low-res pixels per output pixel); a margin of ceil(support) + 1 plus one output pixel
    of rounding on each side is therefore safe.
    """
    out = np.empty_like(boxes)
    for lo_col, hi_col, n_low, n_out in ((0, 2, low[1], size[1]), (1, 3, low[0], size[0])):
        s = n_low / n_out
        m = math.ceil(max(1.0, s)) + 1
        out[:, lo_col] = np.clip(np.floor((boxes[:, lo_col] - m) / s) - 1, 0, n_out - 1)
        out[:, hi_col] = np.clip(np.ceil((boxes[:, hi_col] + 1 + m) / s) + 1, 0, n_out - 1)
    return out


def _intersection(a: Crop, b: Crop) -> int:
    """|A ∩ B| of two cropped masks, exact."""
    (ax, ay, am), (bx, by, bm) = a, b
    x0, y0 = max(ax, bx), max(ay, by)
    x1, y1 = min(ax + am.shape[1], bx + bm.shape[1]), min(ay + am.shape[0], by + bm.shape[0])
    if x1 <= x0 or y1 <= y0:
        return 0
    return int(np.count_nonzero(am[y0 - ay:y1 - ay, x0 - ax:x1 - ax] & bm[y0 - by:y1 - by, x0 - bx:x1 - bx]))


class _MaskCache:
    """Cropped masks of candidates at one resolution, computed on demand in batches: read from the
    caller's cache (`known`) when there, else upsampled now and recorded in `new`."""

    def __init__(self, proposals: Proposals, index: torch.Tensor, size: tuple[int, int],
                 reach: np.ndarray, stats: MatchStats, known: UpsampledMasks, new: UpsampledMasks) -> None:
        self.proposals, self.index, self.size, self.reach, self.stats = proposals, index, size, reach, stats
        self.known, self.new = known, new
        self.crops: dict[int, Crop] = {}
        self.areas: dict[int, int] = {}

    def ensure(self, ranks: list[int]) -> None:
        """Crops of these candidates."""
        missing = sorted(set(ranks) - self.crops.keys())
        if not missing:
            return
        ids = self.index[torch.as_tensor(missing, device=self.index.device)].tolist()
        todo = []  # (rank, proposal index) of the masks no earlier match upsampled
        for r, i in zip(missing, ids):
            crop = self.known.get(i, self.size)
            if crop is None:
                todo.append((r, i))
            else:
                self._keep(r, crop)
        if not todo:
            return
        ranks, sel = [r for r, _ in todo], torch.as_tensor([i for _, i in todo], device=self.index.device)
        for (r, i), crop in zip(todo, upsample_mask_crops(self.proposals.logits_of(sel), self.size,
                                                          self.reach[ranks])):
            self.new.add(i, self.size, crop)
            self._keep(r, crop)
        self.stats.upsampled += len(todo)

    def _keep(self, r: int, crop: Crop) -> None:
        self.crops[r] = crop
        self.areas[r] = int(np.count_nonzero(crop[2]))


class _Merger:
    """Semantic-aware soft merging (step 4) over the candidates, eager or lazy."""

    def __init__(self, proposals: Proposals, cand: _Candidates, opts: MethodOptions,
                 stats: MatchStats, known: UpsampledMasks, new: UpsampledMasks) -> None:
        self.cand, self.exponent, self.stats = cand, opts.merge_exponent, stats
        size, msize = tuple(proposals.image_size), merge_size(proposals.image_size, opts.merge_max_side)
        low = proposals.lowres_shape
        reach = _reach_boxes(cand.boxes, low, msize)
        self.merge = _MaskCache(proposals, cand.index, msize, reach, stats, known, new)
        self.out = self.merge if msize == size else _MaskCache(
            proposals, cand.index, size, _reach_boxes(cand.boxes, low, size), stats, known, new)
        overlap = ((reach[:, None, 0] <= reach[None, :, 2]) & (reach[None, :, 0] <= reach[:, None, 2])
                   & (reach[:, None, 1] <= reach[None, :, 3]) & (reach[None, :, 1] <= reach[:, None, 3]))
        same = cand.labels[:, None] == cand.labels[None, :]
        earlier = np.tril(np.ones((cand.n, cand.n), dtype=bool), k=-1)
        # partners[i]: the masks j whose overlap with i can be non-zero in IoS(i)
        self.partners = [np.flatnonzero(row) for row in (overlap & same & earlier & (cand.sims > 0))]

    def output_crop(self, r: int) -> Crop:
        self.out.ensure([r])
        return self.out.crops[r]

    def _decayed(self, r: int) -> float | None:
        """Decayed score of candidate r (a float32 value), None if its mask is empty.

        Partners are visited by decreasing upper bound of their IoS term (overlap of their reach
        box with i's mask box, over |M_i|, times the cosine); once the running maximum reaches the
        next bound the rest cannot change it, and their masks are never computed.
        """
        self.merge.ensure([r])
        self.out.ensure([r])
        area = self.merge.areas[r]
        if area == 0 or self.out.areas[r] == 0:
            return None
        self.stats.evaluated += 1
        x, y, m = self.merge.crops[r]
        js = self.partners[r]
        reach = self.merge.reach[js]
        w = np.minimum(reach[:, 2], x + m.shape[1] - 1) - np.maximum(reach[:, 0], x) + 1
        h = np.minimum(reach[:, 3], y + m.shape[0] - 1) - np.maximum(reach[:, 1], y) + 1
        bound = np.minimum(w.clip(0) * h.clip(0) / area, 1.0) * self.cand.sims[r, js]
        order = np.argsort(-bound, kind="stable")
        js, bound = js[order], bound[order]
        ios = 0.0
        for start in range(0, len(js), _PARTNER_GROUP):
            group = [j for j, b in zip(js[start:start + _PARTNER_GROUP], bound[start:start + _PARTNER_GROUP])
                     if b > ios]
            if not group:
                break                                   # bounds are sorted: nothing left can win
            self.merge.ensure(group)
            for j in group:
                self.stats.pairs += 1
                inter = _intersection(self.merge.crops[r], self.merge.crops[j])
                ios = max(ios, inter / area * float(self.cand.sims[r, j]))
        score = float(self.cand.scores[r]) * (1.0 - min(ios, 1.0)) ** self.exponent
        return float(np.float32(score))

    def run_all(self) -> list[tuple[float, int]]:
        """Reference order: every candidate's mask, every decayed score."""
        ranks = list(range(self.cand.n))
        self.merge.ensure(ranks)
        self.out.ensure(ranks)
        return [(d, r) for r in ranks if (d := self._decayed(r)) is not None]

    def run_lazy(self, k: int, threshold: float) -> list[tuple[float, int]]:
        """Decayed scores of (a superset of) the candidates that can reach the output."""
        scores = self.cand.scores
        order = sorted(range(self.cand.n), key=lambda r: -scores[r])
        best: list[float] = []        # min-heap of the k best decayed scores
        records: list[tuple[float, int]] = []

        def may_enter(r: int) -> bool:
            return ((len(best) < k or scores[r] >= best[0])
                    and (threshold <= 0 or scores[r] >= threshold))

        pos = 0
        while pos < len(order) and may_enter(order[pos]):
            want = max(k - len(best), _MIN_ROUND)
            batch = []
            for r in order[pos:]:
                if len(batch) == want or not may_enter(r):
                    break
                batch.append(r)
            self.merge.ensure(batch)
            self.out.ensure(batch)
            for r in batch:
                if not may_enter(r):
                    return records
                pos += 1
                d = self._decayed(r)
                if d is None:
                    continue
                records.append((d, r))
                (heapq.heappush if len(best) < k else heapq.heappushpop)(best, d)
        return records


class _GraphMerge:
    """Graph-diffusion rescoring (docs/method.md, "Graph diffusion") in place of step 4.

    Every candidate takes part, in NMS order, with its mask at the DINOv2 feature grid (the low-res
    mask resized there); full-resolution masks are computed only for the output, walking down the
    decayed scores (which never exceed the undecayed ones) until K non-empty ones are found.
    """

    def __init__(self, proposals: Proposals, cand: _Candidates, opts: MethodOptions,
                 stats: MatchStats, known: UpsampledMasks, new: UpsampledMasks) -> None:
        size = tuple(proposals.image_size)
        self.out = _MaskCache(proposals, cand.index, size,
                              _reach_boxes(cand.boxes, proposals.lowres_shape, size), stats, known, new)
        grid = opts.dino_image_size // DINO_PATCH
        masks = feature_masks(proposals.lowres_masks(cand.index), (grid, grid))
        r = graph_diffusion(masks, torch.as_tensor(cand.labels, device=masks.device), opts.graph_alpha,
                            opts.graph_steps, normalise=opts.merge == "graph-normalised")
        scores = diffusion_decay(torch.as_tensor(cand.scores), r.double().cpu(), opts.graph_lambda)
        self.decayed = scores.numpy().astype(np.float32)
        self.lazy = opts.lazy_topk
        stats.evaluated = cand.n

    def output_crop(self, r: int) -> Crop:
        self.out.ensure([r])
        return self.out.crops[r]

    def run(self, k: int, threshold: float) -> list[tuple[float, int]]:
        """(decayed score, rank) of the best K candidates whose full-resolution mask is not empty."""
        order = sorted(range(len(self.decayed)), key=lambda r: (-self.decayed[r], r))
        if not self.lazy:
            self.out.ensure(order)
        records: list[tuple[float, int]] = []
        pos = 0
        while pos < len(order) and len(records) < k:
            batch = order[pos:pos + max(k - len(records), _MIN_ROUND)]
            if self.decayed[batch[0]] <= 0 or self.decayed[batch[0]] < threshold:
                break                                   # sorted: nobody left can be shown
            self.out.ensure(batch)
            for r in batch:
                pos += 1
                if self.out.areas[r] > 0:
                    records.append((float(self.decayed[r]), r))
                    if len(records) == k:
                        break
        return records
