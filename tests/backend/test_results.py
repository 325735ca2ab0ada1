import json

import cv2
import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle
from label_studio_sdk.label_interface import LabelInterface
from pycocotools import mask as mask_utils

from backend.regions.label_config import parse_label_config
from backend.regions.results import detections_to_regions, prediction_item
from model.types import Detections
from tests.backend.fixtures import CONFIG_WITH_ATTRS_XML, CONFIG_XML

# pycocotools 2.0.11 under numpy 2 (third-party, harmless)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn:DeprecationWarning")


def make_detections(masks: list[np.ndarray], labels: list[str], scores: list[float]) -> Detections:
    """Detections as the engine builds them: inclusive xyxy boxes and tight mask crops."""
    H, W = masks[0].shape
    boxes, crops = [], []
    for m in masks:
        ys, xs = np.nonzero(m)
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max(), ys.max()
        boxes.append([x0, y0, x1, y1])
        crops.append((int(x0), int(y0), m[y0:y1 + 1, x0:x1 + 1].copy()))
    return Detections((H, W), np.asarray(boxes, np.float32), np.asarray(scores, np.float32), labels, crops)


def disk(H, W, cx, cy, r):
    yy, xx = np.mgrid[:H, :W]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r ** 2


def rect_mask(H, W, x0, y0, x1, y1):
    m = np.zeros((H, W), bool)
    m[y0:y1 + 1, x0:x1 + 1] = True
    return m


def regions_for(det, xml=CONFIG_XML, **kw):
    kw.setdefault("score_threshold", None)
    kw.setdefault("polygon_tolerance", 1.0)
    return detections_to_regions(det, parse_label_config(xml), **kw)


def assert_valid(xml, regions):
    errors = LabelInterface(xml).validate_prediction(prediction_item(regions, "test-1"), return_errors=True)
    assert errors == []


def iou(a, b):
    return (a & b).sum() / (a | b).sum()


def test_rectangle_percent_by_hand():
    # columns 240..400 and rows 120..280 inclusive = 161 px each, on a 640x480 image
    # (LS percent values: x = 100 * x0 / W, width = 100 * pixel extent / W)
    det = make_detections([rect_mask(480, 640, 240, 120, 400, 280)], ["Cat"], [0.91])
    rect = next(r for r in regions_for(det) if r["type"] == "rectanglelabels")
    assert rect["value"] == {"x": 37.5, "y": 25.0, "width": 25.15625, "height": 100 * 161 / 480,
                             "rotation": 0, "rectanglelabels": ["Cat"]}
    assert rect["value"]["height"] == pytest.approx(33.541666666666664)
    assert (rect["from_name"], rect["to_name"], rect["original_width"], rect["original_height"]) == \
        ("bbox", "image", 640, 480)
    assert rect["image_rotation"] == 0 and rect["score"] == pytest.approx(0.91)


def test_full_image_mask_stays_inside_0_100():
    det = make_detections([np.ones((48, 64), bool)], ["Dog"], [0.5])
    for r in regions_for(det, polygon_tolerance=0.0):
        v = r["value"]
        if r["type"] == "rectanglelabels":
            assert (v["x"], v["y"], v["width"], v["height"]) == (0.0, 0.0, 100.0, 100.0)
        if r["type"] == "polygonlabels":
            pts = np.array(v["points"])
            assert pts.min() >= 0 and pts.max() <= 100


def test_every_region_type_validates_against_the_config():
    H, W = 48, 64
    det = make_detections([disk(H, W, 20, 20, 8), rect_mask(H, W, 40, 10, 60, 40)], ["Cat", "Dog"], [0.9, 0.7])
    regions = regions_for(det)
    assert sorted(r["type"] for r in regions) == ["brushlabels"] * 2 + ["polygonlabels"] * 2 + ["rectanglelabels"] * 2
    assert len({r["id"] for r in regions}) == len(regions)
    assert_valid(CONFIG_XML, regions)
    for r in regions:
        assert set(r) == {"id", "from_name", "to_name", "type", "original_width", "original_height",
                          "image_rotation", "value", "score"}


def test_validator_would_catch_a_bad_region():
    det = make_detections([disk(48, 64, 20, 20, 8)], ["Cat"], [0.9])
    regions = regions_for(det)
    regions[0]["value"][regions[0]["type"]] = ["Zebra"]
    errors = LabelInterface(CONFIG_XML).validate_prediction(prediction_item(regions, "v"), return_errors=True)
    assert errors and "Region 0" in errors[0]


def test_brush_rle_round_trip():
    H, W = 48, 64
    mask = disk(H, W, 30, 22, 11) | rect_mask(H, W, 0, 40, 63, 47)
    det = make_detections([mask], ["Cat"], [0.8])
    brush = next(r for r in regions_for(det) if r["type"] == "brushlabels")
    assert brush["value"]["format"] == "rle"
    assert all(type(v) is int for v in brush["value"]["rle"])
    decoded = decode_rle(brush["value"]["rle"]).reshape(H, W, 4)
    assert set(np.unique(decoded[:, :, 3])) == {0, 255}  # 0/255, not 0/1 (invisible in LS)
    np.testing.assert_array_equal(decoded[:, :, 3] > 0, mask)


def polygon_to_mask(region, H, W):
    pts = np.array(region["value"]["points"]) * [W / 100, H / 100]
    rles = mask_utils.frPyObjects([pts.ravel().tolist()], H, W)
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


def test_polygon_round_trip_with_pycocotools():
    H, W = 60, 80
    blob = disk(H, W, 40, 30, 18)
    det = make_detections([blob], ["Dog"], [0.6])
    polys = [r for r in regions_for(det, polygon_tolerance=1.0) if r["type"] == "polygonlabels"]
    assert len(polys) == 1
    assert polys[0]["value"]["closed"] is True and polys[0]["value"]["polygonlabels"] == ["Dog"]
    assert iou(polygon_to_mask(polys[0], H, W), blob) > 0.9


def test_multi_part_object_yields_one_region_per_part():
    H, W = 60, 80
    a, b = disk(H, W, 15, 15, 9), disk(H, W, 60, 40, 12)
    det = make_detections([a | b], ["Cat"], [0.75])
    polys = [r for r in regions_for(det) if r["type"] == "polygonlabels"]
    assert len(polys) == 2
    masks = [polygon_to_mask(p, H, W) for p in polys]
    best = sorted(max(iou(m, part) for m in masks) for part in (a, b))
    assert best[0] > 0.9
    assert all(p["score"] == pytest.approx(0.75) for p in polys)
    # a one-pixel speck is not a part, and other types stay one region per object
    det = make_detections([a | rect_mask(H, W, 79, 59, 79, 59)], ["Cat"], [0.75])
    types = [r["type"] for r in regions_for(det)]
    assert types.count("polygonlabels") == 1 and types.count("rectanglelabels") == 1


def test_polygon_holes_are_dropped():
    H, W = 60, 80
    ring = disk(H, W, 40, 30, 20) & ~disk(H, W, 40, 30, 8)
    det = make_detections([ring], ["Cat"], [0.9])
    polys = [r for r in regions_for(det) if r["type"] == "polygonlabels"]
    assert len(polys) == 1
    filled = polygon_to_mask(polys[0], H, W)
    assert iou(filled, disk(H, W, 40, 30, 20)) > 0.9  # the outline only; LS polygons have no holes


def test_polygon_tolerance_simplifies_and_control_attribute_overrides():
    H, W = 60, 80
    det = make_detections([disk(H, W, 40, 30, 20)], ["Cat"], [0.9])
    n_points = lambda regions: len(next(r for r in regions if r["type"] == "polygonlabels")["value"]["points"])
    coarse = n_points(regions_for(det, polygon_tolerance=3.0))
    fine = n_points(regions_for(det, polygon_tolerance=0.5))
    exact = n_points(regions_for(det, CONFIG_WITH_ATTRS_XML, polygon_tolerance=3.0))  # attribute says 0
    assert coarse < fine < exact


def test_label_mapping_predicted_values_and_case():
    H, W = 48, 64
    det = make_detections([disk(H, W, 15, 15, 6), disk(H, W, 45, 30, 8), disk(H, W, 50, 10, 5)],
                          ["feline", "dog", "zebra"], [0.9, 0.8, 0.95])
    regions = regions_for(det, CONFIG_WITH_ATTRS_XML)
    got = sorted((r["from_name"], r["value"][r["type"]][0]) for r in regions)
    # "feline" is a predicted_value of bbox's Cat only; "dog" matches Dog case-insensitively; zebra nowhere
    assert got == [("bbox", "Cat"), ("bbox", "Dog"), ("brush", "Dog"), ("poly", "Dog")]
    assert_valid(CONFIG_WITH_ATTRS_XML, regions)


def test_thresholds_and_max_detections():
    H, W = 48, 64
    masks = [disk(H, W, 10 + 14 * i, 24, 5) for i in range(4)]
    det = make_detections(masks, ["Cat"] * 4, [0.3, 0.95, 0.65, 0.55])
    # argument threshold 0.5 for poly/brush; bbox has model_score_threshold=0.6 and model_max_detections=2
    regions = regions_for(det, CONFIG_WITH_ATTRS_XML, score_threshold=0.5)
    scores = {name: sorted((r["score"] for r in regions if r["from_name"] == name), reverse=True)
              for name in ("bbox", "poly", "brush")}
    assert scores["bbox"] == pytest.approx([0.95, 0.65])
    assert scores["poly"] == pytest.approx([0.95, 0.65, 0.55])
    assert scores["brush"] == pytest.approx([0.95, 0.65, 0.55])
    # the argument caps controls without their own limit, best scores first
    regions = regions_for(det, CONFIG_XML, score_threshold=None, max_detections=1)
    assert [r["score"] for r in regions] == pytest.approx([0.95, 0.95, 0.95])


def test_prediction_item_plain_json():
    H, W = 48, 64
    det = make_detections([disk(H, W, 15, 15, 6), disk(H, W, 45, 30, 8)], ["Cat", "Dog"], [0.9, 0.6])
    regions = regions_for(det)
    item = prediction_item(regions, "sam2-l+dinov2-l/refs-1234")
    assert item["model_version"] == "sam2-l+dinov2-l/refs-1234"
    assert item["score"] == pytest.approx(0.75) and type(item["score"]) is float
    json.dumps(item)  # no numpy scalars anywhere

    def walk(o):
        if isinstance(o, dict):
            for v in o.values():
                walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)
        else:
            assert type(o) in (str, int, float, bool), type(o)
    walk(item)
    assert prediction_item([], "v") == {"result": [], "score": 0.0, "model_version": "v"}


def test_no_detections_no_regions():
    assert regions_for(Detections.empty((48, 64))) == []


def test_rectangle_matches_cv2_bounding_rect_of_mask():
    H, W = 50, 70
    m = disk(H, W, 33, 21, 9)
    x, y, w, h = cv2.boundingRect(m.astype(np.uint8))
    det = make_detections([m], ["Cat"], [0.9])
    v = next(r for r in regions_for(det) if r["type"] == "rectanglelabels")["value"]
    assert (v["x"], v["y"], v["width"], v["height"]) == pytest.approx(
        (100 * x / W, 100 * y / H, 100 * w / W, 100 * h / H))


def test_polygon_follows_pixel_edges_by_hand():
    # columns 16..47, rows 12..35 of a 64x48 image: edges at x = 16 and 48, y = 12 and 36
    det = make_detections([rect_mask(48, 64, 16, 12, 47, 35)], ["Cat"], [0.9])
    poly = next(r for r in regions_for(det, polygon_tolerance=0.0) if r["type"] == "polygonlabels")
    assert sorted(map(tuple, poly["value"]["points"])) == [(25.0, 25.0), (25.0, 75.0), (75.0, 25.0), (75.0, 75.0)]
