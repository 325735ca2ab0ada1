"""Full-resolution masks of match candidates, as tight crops (docs/method.md, "Matching", step 3).

Upsampling low-res logits is the only place masks change resolution, and the largest cost of a
match; model.matching asks for masks here only when it needs them. On the CPU a mask whose
conservative box is known is upsampled in that window alone (`upsample_window`, bit-identical to
cropping the full upsampling); intersections of crops are exact integer counts.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .types import Proposals
from .upsampled import Crop, UpsampledMasks

_CHUNK_PIXELS = 1 << 25             # upsampled pixels per interpolate call (memory bound)


def upsample_mask_crops(logits: torch.Tensor, size: tuple[int, int], within: np.ndarray | None = None,
                        max_pixels: int = _CHUNK_PIXELS) -> list[Crop]:
    """Low-res logits [n, h, w] -> masks at `size` (step 3), as tight crops on the CPU.

    The only place masks change resolution. `within`: optional [n, 4] inclusive boxes at `size`
    known to contain the masks (see reach_boxes); thresholding and cropping then only look there,
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


def reach_boxes(boxes: np.ndarray, low: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
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


def intersection(a: Crop, b: Crop) -> int:
    """|A ∩ B| of two cropped masks, exact."""
    (ax, ay, am), (bx, by, bm) = a, b
    x0, y0 = max(ax, bx), max(ay, by)
    x1, y1 = min(ax + am.shape[1], bx + bm.shape[1]), min(ay + am.shape[0], by + bm.shape[0])
    if x1 <= x0 or y1 <= y0:
        return 0
    return int(np.count_nonzero(am[y0 - ay:y1 - ay, x0 - ax:x1 - ax] & bm[y0 - by:y1 - by, x0 - bx:x1 - bx]))


class MaskCrops:
    """Cropped masks of candidates (`index`: their proposal indices, by rank) at one resolution,
    computed on demand in batches: read from the caller's cache (`known`) when there, else
    upsampled now and recorded in `new`."""

    def __init__(self, proposals: Proposals, index: torch.Tensor, size: tuple[int, int],
                 reach: np.ndarray, known: UpsampledMasks, new: UpsampledMasks) -> None:
        self.proposals, self.index, self.size, self.reach = proposals, index, size, reach
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

    def _keep(self, r: int, crop: Crop) -> None:
        self.crops[r] = crop
        self.areas[r] = int(np.count_nonzero(crop[2]))
