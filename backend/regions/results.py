"""Detections -> Label Studio prediction regions (rectangles, polygons, brush masks).

Coordinates are percent of the image as the browser shows it, i.e. of the EXIF-transposed size
`det.image_size = (H, W)`. Pixel conventions:
* rectangles cover whole pixels: a mask spanning columns x0..x1 (inclusive) gives
  x = 100 * x0 / W, width = 100 * (x1 - x0 + 1) / W;
* polygon outlines follow pixel edges: OpenCV traces the centres of the boundary pixels
  (col + 0.5, row + 0.5), half a pixel inside the mask, and the simplified outline is pushed out by
  that half pixel, so a mask spanning columns x0..x1 gives a polygon from x0 to x1 + 1 as LS and
  COCO (pixel-centre-inside rule, see backend.regions.annotations) read it;
* brush masks are LS-RLE of the full H x W mask with values 0/255.
Every number is a plain Python int/float so the result can go straight to JSON.
"""
from __future__ import annotations

import uuid
from collections.abc import Mapping

import cv2
import numpy as np

from backend.regions.brush_rle import mask_to_ls_rle
from backend.regions.label_config import Control, LabelConfig
from model.types import Detections

# Polygon parts smaller than this (px², between boundary-pixel centres) are dropped as specks.
MIN_POLYGON_AREA_PX = 1.0


def _region_id() -> str:
    return uuid.uuid4().hex[:10]


def _pct(v: float, size: int) -> float:
    return float(min(100.0, max(0.0, 100.0 * v / size)))


def _rectangle_value(x0: int, y0: int, crop: np.ndarray, W: int, H: int) -> dict:
    rows = np.flatnonzero(crop.any(axis=1))
    cols = np.flatnonzero(crop.any(axis=0))
    bx0, bx1 = x0 + int(cols[0]), x0 + int(cols[-1])
    by0, by1 = y0 + int(rows[0]), y0 + int(rows[-1])
    return {"x": _pct(bx0, W), "y": _pct(by0, H), "width": _pct(bx1 - bx0 + 1, W),
            "height": _pct(by1 - by0 + 1, H), "rotation": 0}


def _outset(points: np.ndarray, distance: float) -> np.ndarray:
    """Move each vertex of a closed polygon outwards by `distance` (mitred, capped at 2x on sharp
    corners)."""
    nxt = np.roll(points, -1, axis=0)
    edges = nxt - points
    twice_area = float(np.sum(points[:, 0] * nxt[:, 1] - nxt[:, 0] * points[:, 1]))
    normals = np.sign(twice_area) * np.stack([edges[:, 1], -edges[:, 0]], axis=1)  # outward side
    normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)
    n_in, n_out = np.roll(normals, 1, axis=0), normals  # normals of the edges ending / starting at a vertex
    cos = np.sum(n_in * n_out, axis=1, keepdims=True)
    return points + distance * (n_in + n_out) / np.maximum(1.0 + cos, 0.5)


def polygon_parts(x0: int, y0: int, crop: np.ndarray, tolerance: float) -> list[np.ndarray]:
    """Outer outlines of the mask crop in image pixel coordinates (pixel i spans [i, i+1)), one
    float array [N, 2] of (x, y) per part.

    RETR_CCOMP separates outer boundaries from holes; holes are dropped because LS polygons cannot
    have them (the annotator sees the object filled). An island inside a hole is an outer boundary
    of its own and becomes its own part. Parts with < 3 vertices or a tiny area are dropped.
    """
    padded = np.pad(crop.astype(np.uint8), 1)
    contours, hierarchy = cv2.findContours(padded, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    parts = []
    for contour, (_, _, _, parent) in zip(contours, hierarchy[0] if hierarchy is not None else []):
        if parent != -1:
            continue
        if tolerance > 0:
            contour = cv2.approxPolyDP(contour, tolerance, True)
        if len(contour) < 3 or cv2.contourArea(contour) < MIN_POLYGON_AREA_PX:
            continue
        centres = contour[:, 0, :].astype(np.float64) + [x0 - 1 + 0.5, y0 - 1 + 0.5]  # undo the pad
        parts.append(_outset(centres, 0.5))
    return parts


def _polygon_value(points: np.ndarray, W: int, H: int) -> dict:
    # the same float64 arithmetic as _pct, for all vertices at once
    return {"points": np.clip(100.0 * np.asarray(points, dtype=np.float64) / [W, H], 0.0, 100.0).tolist(),
            "closed": True}


def _brush_value(mask: np.ndarray) -> dict:
    return {"format": "rle", "rle": mask_to_ls_rle(mask)}  # = the SDK's mask2rle(mask * 255), faster


def _region(control: Control, label: str, value: dict, score: float, W: int, H: int) -> dict:
    return {
        "id": _region_id(),
        "from_name": control.name,
        "to_name": control.to_name,
        "type": control.type,
        "original_width": int(W),
        "original_height": int(H),
        "image_rotation": 0,
        "value": {**value, control.type: [label]},
        "score": float(score),
    }


def _control_regions(det: Detections, control: Control, threshold: float | None,
                     tolerance: float, max_detections: int | None,
                     class_thresholds: Mapping[str, float] | None = None) -> list[dict]:
    H, W = det.image_size
    order = sorted(range(len(det)), key=lambda i: -float(det.scores[i]))
    regions: list[dict] = []
    emitted = 0
    for i in order:
        if max_detections is not None and emitted >= max_detections:
            break
        score = float(det.scores[i])
        label = control.output_label(det.labels[i])
        floor = (class_thresholds or {}).get(det.labels[i], threshold)
        if label is None or (floor is not None and score < floor):
            continue
        x0, y0, crop = det.masks[i]
        if not crop.any():
            continue
        if control.type == "rectanglelabels":
            values = [_rectangle_value(x0, y0, crop, W, H)]
        elif control.type == "polygonlabels":
            values = [_polygon_value(p, W, H) for p in polygon_parts(x0, y0, crop, tolerance)]
        else:
            values = [_brush_value(det.mask(i))]
        if values:
            emitted += 1
        regions += [_region(control, label, v, score, W, H) for v in values]
    return regions


def detections_to_regions(det: Detections, config: LabelConfig, *, score_threshold: float | None,
                          polygon_tolerance: float, max_detections: int | None = None,
                          class_thresholds: Mapping[str, float] | None = None) -> list[dict]:
    """LS regions for every supported control of `config`.

    Per control: detections whose class maps to one of its labels (Control.output_label) and whose
    score reaches the threshold, best first, at most max_detections instances (a multi-part
    polygon counts once). `class_thresholds` (class -> calibrated threshold) replace
    score_threshold for their classes. Control attributes (model_score_threshold,
    model_max_detections, model_polygon_tolerance) override the arguments, calibrated thresholds
    included. polygon_tolerance is the approxPolyDP epsilon in pixels (0 keeps every contour vertex).
    """
    regions: list[dict] = []
    for control in config.controls:
        own = control.score_threshold is not None
        threshold = control.score_threshold if own else score_threshold
        tolerance = control.polygon_tolerance if control.polygon_tolerance is not None else polygon_tolerance
        limit = control.max_detections if control.max_detections is not None else max_detections
        regions += _control_regions(det, control, threshold, float(tolerance), limit,
                                    None if own else class_thresholds)
    return regions


def mask_regions(mask: np.ndarray, control: Control, label: str, score: float,
                 polygon_tolerance: float) -> list[dict]:
    """Regions of one full-size HxW bool mask for a brush or polygon control (a click's answer):
    one brush region, or one polygon region per outer outline; none for an empty mask."""
    H, W = mask.shape
    if not mask.any():
        return []
    if control.type == "brushlabels":
        values = [_brush_value(mask)]
    elif control.type == "polygonlabels":
        tolerance = control.polygon_tolerance if control.polygon_tolerance is not None else polygon_tolerance
        values = [_polygon_value(p, W, H) for p in polygon_parts(0, 0, mask, float(tolerance))]
    else:
        raise ValueError(f"control '{control.name}' ({control.type}) cannot hold a mask")
    return [_region(control, label, v, score, W, H) for v in values]


def prediction_item(regions: list[dict], model_version: str) -> dict:
    """One element of the /predict `results` list (and the body of POST /api/predictions)."""
    score = float(np.mean([r["score"] for r in regions])) if regions else 0.0
    return {"result": regions, "score": score, "model_version": model_version}
