"""Label Studio annotation regions -> reference masks/boxes for the memory bank.

Each supported region (brushlabels, polygonlabels, rectanglelabels with exactly one label, on the
config's Image) becomes one Reference; everything else (choices, keypoints, text areas, relations,
regions on another Image, unlabeled shapes) is ignored. Broken regions are skipped with a warning
that names them, never raised: one bad region must not block learning from the others.

Sizes: percent coordinates are converted with the size of the image actually loaded
(`image_size`, EXIF-transposed) when given, else with the region's original_width/height. A brush
RLE always describes original_height x original_width pixels; when the loaded image has another
size the decoded mask is resized to it (nearest neighbour).

Annotations arrive from webhooks and the LS API: `annotation_references` bounds every number
before the rasterisers see it (`region_problem`).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import cv2
import numpy as np
from label_studio_sdk.converter.brush import decode_rle
from pycocotools import mask as mask_utils

from backend.regions.label_config import LabelConfig

log = logging.getLogger(__name__)

_SUPPORTED = ("brushlabels", "polygonlabels", "rectanglelabels")
MAX_COORDINATE = 1e4  # |percent| beyond which region coordinates are garbage (LS uses 0..100)


@dataclass
class Reference:
    """One reference object. Exactly one of mask / box is set.

    mask: HxW bool at the loaded image size. box: (x0, y0, x1, y1) in continuous pixel
    coordinates (edges: x1 = x0 + width), for axis-aligned rectangles that SAM2 turns into a mask.
    """

    ref_id: str
    label: str
    mask: np.ndarray | None
    box: tuple[float, float, float, float] | None


def _fill_polygon(points_px: np.ndarray, W: int, H: int) -> np.ndarray:
    """Rasterise a polygon given in continuous pixel coordinates (pixel i spans [i, i+1)).

    pycocotools (the COCO reference rasteriser) fills the pixels whose centre lies inside, which is
    what LS's polygon coordinates mean; cv2.fillPoly also fills pixels up to half a pixel outside
    the outline, growing every reference by about one pixel in width and height.
    """
    rle = mask_utils.frPyObjects([points_px.ravel().tolist()], H, W)
    return mask_utils.decode(rle)[:, :, 0].astype(bool)


def _rectangle_corners(v: dict, W: int, H: int) -> np.ndarray:
    """Corners in pixels; LS rotates clockwise (degrees) around the top-left corner (x, y)."""
    x, y = float(v["x"]) * W / 100, float(v["y"]) * H / 100
    w, h = float(v["width"]) * W / 100, float(v["height"]) * H / 100
    a = math.radians(float(v.get("rotation") or 0.0))
    ux, uy = math.cos(a), math.sin(a)  # along the width (y axis points down)
    vx, vy = -math.sin(a), math.cos(a)  # along the height
    return np.array([[x, y], [x + w * ux, y + w * uy], [x + w * ux + h * vx, y + w * uy + h * vy],
                     [x + h * vx, y + h * vy]])


def _rle_mask(rle: list[int], oh: int, ow: int, W: int, H: int, where: str) -> np.ndarray | None:
    # The first 32 bits hold the value count; check it before decoding (decode allocates it).
    if len(rle) < 4 or int.from_bytes(bytes(int(b) & 0xFF for b in rle[:4]), "big") != oh * ow * 4:
        log.warning("skipping %s: brush RLE does not describe %dx%d pixels (original_width x original_height)",
                    where, ow, oh)
        return None
    try:
        mask = decode_rle(rle).reshape(oh, ow, 4)[:, :, 3] > 0
    except (ValueError, IndexError) as e:
        log.warning("skipping %s: brush RLE cannot be decoded (%s)", where, e)
        return None
    if (oh, ow) != (H, W):
        mask = cv2.resize(mask.astype(np.uint8), (W, H), interpolation=cv2.INTER_NEAREST).astype(bool)
    return mask


def _region_reference(region: dict, ref_id: str, label: str, W: int, H: int, where: str) -> Reference | None:
    v = region["value"]
    kind = region["type"]
    if kind == "brushlabels":
        oh, ow = int(region.get("original_height") or H), int(region.get("original_width") or W)
        mask = _rle_mask(v.get("rle") or [], oh, ow, W, H, where)
    elif kind == "polygonlabels":
        points = np.asarray(v.get("points") or [], dtype=np.float64).reshape(-1, 2)
        if len(points) < 3:
            log.warning("skipping %s: polygon has fewer than 3 points", where)
            return None
        mask = _fill_polygon(points * [W / 100, H / 100], W, H)
    elif float(v.get("rotation") or 0.0) % 360 != 0:
        mask = _fill_polygon(_rectangle_corners(v, W, H), W, H)
    else:
        x0, y0, x1, y1 = _rectangle_corners(v, W, H)[[0, 2]].ravel()
        x0, x1 = sorted((min(max(x0, 0.0), W), min(max(x1, 0.0), W)))
        y0, y1 = sorted((min(max(y0, 0.0), H), min(max(y1, 0.0), H)))
        if x1 - x0 <= 0 or y1 - y0 <= 0:
            log.warning("skipping %s: rectangle is empty or outside the image", where)
            return None
        return Reference(ref_id, label, None, (float(x0), float(y0), float(x1), float(y1)))
    if mask is None:
        return None
    if not mask.any():
        log.warning("skipping %s: region is empty or outside the image", where)
        return None
    return Reference(ref_id, label, mask, None)


def regions_to_references(annotation_result: list[dict], config: LabelConfig,
                          image_size: tuple[int, int] | None = None, *,
                          annotation_id: int | str) -> list[Reference]:
    """References from one annotation's `result` list; ref_id = f"{annotation_id}:{region_id}".

    image_size: (W, H) of the loaded, EXIF-transposed image; it overrides the regions'
    original_width/height when they disagree (percent coordinates are rescaled, brush masks
    resized), because the reference must line up with the pixels the engine sees.
    """
    images = {c.to_name for c in config.controls}
    refs: list[Reference] = []
    for n, region in enumerate(annotation_result or []):
        kind = region.get("type")
        if kind not in _SUPPORTED or region.get("to_name", next(iter(images))) not in images:
            continue
        region_id = region.get("id") or str(n)
        where = f"region {region_id} ({kind}, from_name={region.get('from_name')}) of annotation {annotation_id}"
        value = region.get("value")
        labels = value.get(kind) if isinstance(value, dict) else None
        if not isinstance(labels, list) or len(labels) != 1:
            log.warning("skipping %s: needs exactly one label, has %s", where, labels)
            continue
        if image_size is not None:
            W, H = image_size
            ow, oh = region.get("original_width"), region.get("original_height")
            if ow and oh and (int(ow), int(oh)) != (W, H):
                log.info("%s: original size %sx%s differs from the loaded image %dx%d; rescaling",
                         where, ow, oh, W, H)
        elif region.get("original_width") and region.get("original_height"):
            W, H = int(region["original_width"]), int(region["original_height"])
        else:
            log.warning("skipping %s: no original_width/height and no image size", where)
            continue
        try:
            ref = _region_reference(region, f"{annotation_id}:{region_id}", str(labels[0]), W, H, where)
        except (KeyError, TypeError, ValueError) as e:
            log.warning("skipping %s: malformed value (%s)", where, e)
            continue
        if ref is not None:
            refs.append(ref)
    return refs


def annotation_regions(annotation: dict) -> list:
    """The annotation's `result` list ([] when it is not a list)."""
    result = annotation.get("result")
    return result if isinstance(result, list) else []


def region_problem(region: object, max_pixels: int) -> str | None:
    """Why an annotation's `result` entry is unsafe to hand to the rasterisers (None if it is not).

    The entries come straight from Label Studio (or a webhook payload). pycocotools' polygon
    rasteriser crashes the whole process (SIGSEGV) on NaN or huge coordinates, and a brush RLE is
    decoded into original_width x original_height pixels, so both are bounded here (`max_pixels`:
    MAX_IMAGE_PIXELS), before any decoding.
    """
    if not isinstance(region, dict):
        return "not a region object"
    if not all(isinstance(region.get(k), (str, type(None))) for k in ("type", "from_name", "to_name")):
        return "type, from_name and to_name must be strings"
    value = region.get("value")
    if not isinstance(value, dict):
        return None  # regions_to_references skips it as malformed
    try:
        numbers = [float(value[k]) for k in ("x", "y", "width", "height", "rotation") if value.get(k) is not None]
        if value.get("points") is not None:
            numbers += np.asarray(value["points"], dtype=np.float64).ravel().tolist()
        size = [float(region[k]) for k in ("original_width", "original_height") if region.get(k) is not None]
    except (TypeError, ValueError):
        return "coordinates or size are not numbers"
    if not all(math.isfinite(n) and abs(n) <= MAX_COORDINATE for n in numbers):
        return f"coordinates are not finite numbers within +-{MAX_COORDINATE:g} percent"
    if not all(math.isfinite(n) and n >= 0 for n in size) or math.prod(size) > max_pixels:
        return "original_width x original_height is not a size within MAX_IMAGE_PIXELS"
    rle = value.get("rle")
    if rle is not None and not (isinstance(rle, list)
                                and all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b <= 255 for b in rle)):
        return "brush RLE is not a list of byte values"
    return None


def annotation_references(annotation: dict, config: LabelConfig, image_size: tuple[int, int], *,
                          max_pixels: int) -> list[Reference]:
    """References of one annotation's regions (image_size: W, H of the loaded image).

    Entries that are not region objects, or whose numbers could crash or exhaust the rasterisers
    (`region_problem`), are skipped with a warning, like every other unusable region.
    """
    usable = []
    for n, region in enumerate(annotation_regions(annotation)):
        problem = region_problem(region, max_pixels)
        if problem:
            rid = region.get("id") if isinstance(region, dict) else None
            log.warning("skipping region %s of annotation %s: %s", rid or n, annotation.get("id"), problem)
            continue
        usable.append(region if region.get("id") else {**region, "id": str(n)})  # ids as before filtering
    return regions_to_references(usable, config, image_size=image_size, annotation_id=annotation["id"])
