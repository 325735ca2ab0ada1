"""model.corrections: which predicted regions an annotation turned into negatives, on hand-made masks."""
from __future__ import annotations

import numpy as np
import pytest

from model.corrections import Negative, Region, find_negatives

SIZE = (20, 30)


def rect(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """Mask of the pixels x0 <= x < x1, y0 <= y < y1."""
    m = np.zeros(SIZE, bool)
    m[y0:y1, x0:x1] = True
    return m


def test_kept_removed_and_relabelled():
    predicted = [Region("cat", rect(0, 0, 10, 10)),      # annotated as cat, slightly trimmed: kept
                 Region("cat", rect(12, 0, 20, 10)),     # nothing annotated there: removed
                 Region("dog", rect(0, 12, 10, 20)),     # annotated as a cow: relabelled
                 Region("dog", rect(22, 0, 30, 10))]     # a cat annotated there, IoU 0.4 only: removed
    annotated = [Region("cat", rect(0, 0, 10, 9)), Region("cow", rect(0, 12, 10, 20)),
                 Region("cat", rect(22, 0, 30, 4))]
    assert find_negatives(predicted, annotated, SIZE) == [
        Negative(1, "cat", "removed"), Negative(2, "dog", "relabelled"), Negative(3, "dog", "removed")]


def test_iou_threshold_is_inclusive_and_same_label_wins():
    half = rect(0, 0, 10, 10)
    assert find_negatives([Region("cat", half)], [Region("cat", rect(0, 0, 10, 5))], SIZE) == []   # IoU 0.5
    assert find_negatives([Region("cat", half)], [Region("cat", rect(0, 0, 10, 4))], SIZE) == [
        Negative(0, "cat", "removed")]                                                              # IoU 0.4
    both = [Region("dog", half), Region("cat", half)]          # also kept as a cat: no negative
    assert find_negatives([Region("cat", half)], both, SIZE) == []


def test_boxes_and_masks_mix():
    predicted = [Region("cat", box=(2, 3, 12, 8)), Region("dog", rect(2, 3, 12, 8))]
    annotated = [Region("cat", rect(2, 3, 12, 8)), Region("cow", box=(2.0, 3.0, 12.0, 8.0))]
    assert find_negatives(predicted, annotated, SIZE) == [Negative(1, "dog", "relabelled")]


def test_an_empty_annotation_removes_every_predicted_region():
    predicted = [Region("cat", rect(0, 0, 5, 5)), Region("dog", box=(10, 10, 20, 20))]
    assert find_negatives(predicted, [], SIZE) == [Negative(0, "cat", "removed"), Negative(1, "dog", "removed")]
    assert find_negatives([], [Region("cat", rect(0, 0, 5, 5))], SIZE) == []


def test_bad_regions_are_refused():
    with pytest.raises(ValueError, match="either a mask or a box"):
        Region("cat")
    with pytest.raises(ValueError, match="either a mask or a box"):
        Region("cat", rect(0, 0, 1, 1), (0, 0, 1, 1))
    with pytest.raises(ValueError, match="bool"):
        Region("cat", rect(0, 0, 1, 1).astype(np.uint8))
    with pytest.raises(ValueError, match="shape"):
        find_negatives([Region("cat", np.ones((5, 5), bool))], [Region("cat", rect(0, 0, 1, 1))], SIZE)
