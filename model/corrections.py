"""Negatives from an annotator's corrections of a prediction (docs/method.md, "Negatives").

Pure geometry: given the regions a prediction proposed and the regions the submitted annotation
holds (each a label plus a boolean mask or a box), a predicted region of label L is
  * kept when an annotated region of label L overlaps it at IoU >= 0.5 (no negative);
  * relabelled when it is not kept but an annotated region of another label overlaps it at
    IoU >= 0.5: a negative of L;
  * removed otherwise: a negative of L.
IoU is pycocotools' mask IoU (boxes are rasterised first), so masks and boxes mix freely.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pycocotools import mask as mask_utils

IOU_MATCH = 0.5


@dataclass(frozen=True)
class Region:
    """One labelled region: a boolean [H, W] mask, or a box (x0, y0, x1, y1) in pixel
    coordinates of an image of `image_size` (H, W) with exclusive x1, y1."""

    label: str
    mask: np.ndarray | None = None
    box: tuple[float, float, float, float] | None = None

    def __post_init__(self) -> None:
        if (self.mask is None) == (self.box is None):
            raise ValueError("a region has either a mask or a box")
        if self.mask is not None and (self.mask.ndim != 2 or self.mask.dtype != bool):
            raise ValueError(f"a region mask must be a 2-D bool array, got {self.mask.dtype} {self.mask.shape}")


@dataclass(frozen=True)
class Negative:
    """Predicted region `index` is a negative of `label` (its predicted label)."""

    index: int
    label: str
    reason: Literal["removed", "relabelled"]


def find_negatives(predicted: Sequence[Region], annotated: Sequence[Region],
                   image_size: tuple[int, int], iou_match: float = IOU_MATCH) -> list[Negative]:
    """The negatives that an annotation (`annotated`) makes of a prediction (`predicted`), in the
    order of `predicted`; see the module docstring."""
    if not predicted:
        return []
    iou = _iou(predicted, annotated, image_size)                       # [P, A]
    same = np.array([[p.label == a.label for a in annotated] for p in predicted], bool).reshape(iou.shape)
    hit = iou >= iou_match
    out = []
    for i, region in enumerate(predicted):
        if (hit[i] & same[i]).any():
            continue
        out.append(Negative(i, region.label, "relabelled" if (hit[i] & ~same[i]).any() else "removed"))
    return out


def _iou(a: Sequence[Region], b: Sequence[Region], image_size: tuple[int, int]) -> np.ndarray:
    if not b:
        return np.zeros((len(a), 0))
    ra, rb = _rles(a, image_size), _rles(b, image_size)
    return np.asarray(mask_utils.iou(ra, rb, [0] * len(rb)), dtype=np.float64).reshape(len(a), len(b))


def _rles(regions: Sequence[Region], image_size: tuple[int, int]) -> list[dict]:
    h, w = int(image_size[0]), int(image_size[1])
    out = []
    for r in regions:
        if r.mask is not None:
            if r.mask.shape != (h, w):
                raise ValueError(f"region mask of shape {r.mask.shape}, image is {(h, w)}")
            out.append(mask_utils.encode(np.asfortranarray(r.mask.astype(np.uint8))))
        else:
            x0, y0, x1, y1 = (float(v) for v in r.box)
            box = np.array([[x0, y0, max(0.0, x1 - x0), max(0.0, y1 - y0)]], dtype=np.float64)
            out.append(mask_utils.frPyObjects(box, h, w)[0])
    return out
