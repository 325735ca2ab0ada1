import copy
import logging

import numpy as np
import pytest

from backend.regions.annotations import regions_to_references
from backend.regions.label_config import parse_label_config
from backend.regions.results import detections_to_regions
from tests.backend.fixtures import (BRUSH_REGION, CONFIG_XML, POLY_REGION, RECT_REGION,
                                    WEBHOOK_ANNOTATION_UPDATED)
from tests.backend.test_results import disk, make_detections

# pycocotools 2.0.11 under numpy 2 (third-party, harmless)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn:DeprecationWarning")

CFG = parse_label_config(CONFIG_XML)


def refs(result, image_size=None, annotation_id=7):
    return regions_to_references(result, CFG, image_size, annotation_id=annotation_id)


def expected_box_mask(H=48, W=64, rows=(12, 36), cols=(16, 48)):
    m = np.zeros((H, W), bool)
    m[rows[0]:rows[1], cols[0]:cols[1]] = True
    return m


def test_webhook_annotation_all_three_types():
    ann = WEBHOOK_ANNOTATION_UPDATED["annotation"]
    out = regions_to_references(ann["result"], CFG, annotation_id=ann["id"])
    assert [(r.ref_id, r.label) for r in out] == [("1:a1", "Dog"), ("1:p1", "Dog"), ("1:b1", "Cat")]
    rect, poly, brush = out
    # rectangle x=20 y=20 w=40 h=40 (%) on 64x48 -> continuous pixel edges
    assert rect.mask is None and rect.box == pytest.approx((12.8, 9.6, 38.4, 28.8))
    # polygon 25..75 % -> edges x 16..48, y 12..36 -> exactly the pixels whose centres are inside
    assert poly.box is None and poly.mask.dtype == bool
    np.testing.assert_array_equal(poly.mask, expected_box_mask())
    # brush RLE of rows 12..35, cols 16..47
    np.testing.assert_array_equal(brush.mask, expected_box_mask())


def test_brush_resized_when_loaded_image_size_differs():
    (ref,) = refs([BRUSH_REGION], image_size=(128, 96))
    assert ref.mask.shape == (96, 128)
    np.testing.assert_array_equal(ref.mask, np.kron(expected_box_mask(), np.ones((2, 2), bool)))


def test_rectangle_uses_loaded_image_size(caplog):
    with caplog.at_level(logging.INFO):
        (ref,) = refs([RECT_REGION], image_size=(640, 480))
    assert ref.box == pytest.approx((128.0, 96.0, 384.0, 288.0))
    assert "differs from the loaded image 640x480" in caplog.text


def test_rotated_rectangle_is_rasterised():
    region = {"id": "rot", "from_name": "bbox", "to_name": "image", "type": "rectanglelabels",
              "original_width": 100, "original_height": 100, "image_rotation": 0,
              "value": {"x": 50, "y": 25, "width": 20, "height": 10, "rotation": 90, "rectanglelabels": ["Cat"]}}
    (ref,) = refs([region])
    # 90 deg clockwise around the top-left (50, 25): the 20 px width runs down, the 10 px height runs left
    assert ref.box is None
    ys, xs = np.nonzero(ref.mask)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (40, 49, 25, 44)
    assert ref.mask.sum() == 200
    region["value"]["rotation"] = 30
    (ref,) = refs([region])
    assert abs(int(ref.mask.sum()) - 200) <= 20  # area kept
    ys, xs = np.nonzero(ref.mask)
    assert xs.min() >= 44 and ys.min() >= 24  # rotated clockwise: the far corners move right/down and left


def test_polygon_round_trip_through_results():
    H, W = 60, 80
    blob = disk(H, W, 40, 30, 18)
    det = make_detections([blob], ["Dog"], [0.9])
    regions = detections_to_regions(det, CFG, score_threshold=None, polygon_tolerance=0.0)
    poly = next(r for r in regions if r["type"] == "polygonlabels")
    brush = next(r for r in regions if r["type"] == "brushlabels")
    out = refs([poly, brush])
    np.testing.assert_array_equal(out[0].mask, blob)  # pixel-centre vertices rasterise back exactly
    np.testing.assert_array_equal(out[1].mask, blob)


def test_length_mismatched_rle_is_skipped_with_a_warning(caplog):
    bad = copy.deepcopy(BRUSH_REGION)
    bad["id"], bad["original_width"] = "wrongsize", 60
    garbage = copy.deepcopy(BRUSH_REGION)
    garbage["id"], garbage["value"]["rle"] = "garbage", [1, 2, 3]
    with caplog.at_level(logging.WARNING):
        out = refs([bad, garbage, BRUSH_REGION])
    assert [r.ref_id for r in out] == ["7:b1"]
    assert "region wrongsize" in caplog.text and "region garbage" in caplog.text


def test_regions_outside_the_image(caplog):
    outside = copy.deepcopy(RECT_REGION)
    outside["id"], outside["value"]["x"] = "far", 120
    partly = copy.deepcopy(RECT_REGION)
    partly["id"], partly["value"]["x"] = "edge", 90
    poly_out = copy.deepcopy(POLY_REGION)
    poly_out["id"], poly_out["value"]["points"] = "polyfar", [[110, 110], [130, 110], [130, 130]]
    poly_part = copy.deepcopy(POLY_REGION)
    poly_part["id"], poly_part["value"]["points"] = "polyedge", [[50, 50], [150, 50], [150, 150], [50, 150]]
    with caplog.at_level(logging.WARNING):
        out = refs([outside, partly, poly_out, poly_part])
    assert [r.ref_id for r in out] == ["7:edge", "7:polyedge"]
    assert out[0].box == pytest.approx((57.6, 9.6, 64.0, 28.8))
    np.testing.assert_array_equal(out[1].mask, expected_box_mask(rows=(24, 48), cols=(32, 64)))
    assert "region far" in caplog.text and "region polyfar" in caplog.text


def test_unsupported_and_unlabeled_regions(caplog):
    other = [
        {"id": "c", "from_name": "quality", "to_name": "image", "type": "choices", "value": {"choices": ["good"]}},
        {"id": "k", "from_name": "kp", "to_name": "image", "type": "keypointlabels", "original_width": 64,
         "original_height": 48, "value": {"x": 1, "y": 1, "width": 1, "keypointlabels": ["Cat"]}},
        {"id": "t", "from_name": "txt", "to_name": "image", "type": "textarea", "value": {"text": ["hi"]}},
        {"from_id": "a1", "to_id": "b1", "type": "relation", "direction": "right"},
        {"id": "plain", "from_name": "r", "to_name": "image", "type": "rectangle", "original_width": 64,
         "original_height": 48, "value": {"x": 1, "y": 1, "width": 5, "height": 5, "rotation": 0}},
        {**RECT_REGION, "id": "elsewhere", "to_name": "other_image"},
    ]
    two_labels = copy.deepcopy(RECT_REGION)
    two_labels["id"], two_labels["value"]["rectanglelabels"] = "two", ["Cat", "Dog"]
    with caplog.at_level(logging.WARNING):
        out = refs(other + [two_labels, RECT_REGION])
    assert [r.ref_id for r in out] == ["7:a1"]
    assert "region two" in caplog.text and "exactly one label" in caplog.text
    assert "region c " not in caplog.text


def test_missing_sizes_without_image_size_is_skipped(caplog):
    region = {k: v for k, v in RECT_REGION.items() if k not in ("original_width", "original_height")}
    with caplog.at_level(logging.WARNING):
        assert refs([region]) == []
    assert "no original_width/height" in caplog.text
    (ref,) = refs([region], image_size=(64, 48))
    assert ref.box == pytest.approx((12.8, 9.6, 38.4, 28.8))


def test_empty_result():
    assert refs([]) == [] and refs(None) == []
