"""Matching proposals against the memory bank (docs/method.md, "Matching").

Steps, as the reference does them:
  1. s[i, c] = max(0, f_i · p_c); label = argmax, score = max.
  2. Class-aware box NMS on the low-res masks ranked by SAM's predicted IoU, keep the first
     pre_merge_factor × K survivors, drop score <= 0.
  3. Full-resolution masks: bilinear (antialias, align_corners=False) upsampling of the logits,
     > 0 — done only in model.mask_crops, on demand.
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
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.ops import batched_nms

from .bank import MemoryBank
from .graph_diffusion import DINO_PATCH, diffusion_decay, feature_masks, graph_diffusion
from .mask_crops import MaskCrops, intersection, merge_size, reach_boxes
from .options import MethodOptions
from .types import Detections, Proposals
from .upsampled import Crop, UpsampledMasks

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
    stats.upsampled = len(new)  # every mask this match upsampled, at each resolution, is recorded there
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


class _Merger:
    """Semantic-aware soft merging (step 4) over the candidates, eager or lazy."""

    def __init__(self, proposals: Proposals, cand: _Candidates, opts: MethodOptions,
                 stats: MatchStats, known: UpsampledMasks, new: UpsampledMasks) -> None:
        self.cand, self.exponent, self.stats = cand, opts.merge_exponent, stats
        size, msize = tuple(proposals.image_size), merge_size(proposals.image_size, opts.merge_max_side)
        low = proposals.lowres_shape
        reach = reach_boxes(cand.boxes, low, msize)
        self.merge = MaskCrops(proposals, cand.index, msize, reach, known, new)
        self.out = self.merge if msize == size else MaskCrops(
            proposals, cand.index, size, reach_boxes(cand.boxes, low, size), known, new)
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
                inter = intersection(self.merge.crops[r], self.merge.crops[j])
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
        self.out = MaskCrops(proposals, cand.index, size,
                             reach_boxes(cand.boxes, proposals.lowres_shape, size), known, new)
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
