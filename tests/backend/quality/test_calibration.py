"""Calibrated thresholds and the variant choice on hand-made numbers (backend.quality.calibration)."""
from __future__ import annotations

import itertools

import pytest

from backend.quality.calibration import (best_f1_threshold, calibrate, choose_variant, operating_point,
                                         target_precision_threshold, threshold_in_force)

# 4 ground-truth regions; detections by score (T = true positive, F = false positive):
# 0.9 T, 0.85 F, 0.8 T, 0.6 F, 0.5 T, 0.3 F
TP, FP, N = [0.9, 0.8, 0.5], [0.85, 0.6, 0.3], 4
# kept at threshold t (score >= t): TP, FP -> F1 = 2 TP / (N + TP + FP)
HAND_F1 = {0.9: 2 / 5, 0.85: 2 / 6, 0.8: 4 / 7, 0.6: 4 / 8, 0.5: 6 / 9, 0.3: 6 / 10}


def test_best_f1_threshold_is_the_hand_computed_maximum():
    point = best_f1_threshold(TP, FP, N)
    assert point.threshold == 0.5 and point.f1 == pytest.approx(2 / 3)
    assert point.precision == pytest.approx(3 / 5) and point.recall == pytest.approx(3 / 4)
    for t, f1 in HAND_F1.items():                # every candidate, and between candidates
        assert operating_point(TP, FP, N, t).f1 == pytest.approx(f1)
        assert operating_point(TP, FP, N, t - 0.01).f1 <= point.f1
    assert max(HAND_F1.values()) == pytest.approx(point.f1)


def test_best_f1_threshold_maximises_f1_over_every_threshold():
    """Brute force over small score lists: no threshold at all beats the chosen one."""
    scores = [0.2, 0.4, 0.4, 0.7, 0.9]
    for flags in itertools.product([True, False], repeat=len(scores)):
        tp = [s for s, f in zip(scores, flags) if f]
        fp = [s for s, f in zip(scores, flags) if not f]
        for n in (len(tp), len(tp) + 2):
            point = best_f1_threshold(tp, fp, n)
            if not tp:
                assert point is None
                continue
            best = max(operating_point(tp, fp, n, t).f1 for t in [0.0, 0.1, 0.3, 0.4, 0.5, 0.8, 0.9, 1.0])
            assert point.f1 == pytest.approx(best)


def test_ties_keep_the_higher_threshold_and_nothing_found_gives_none():
    # 0.9 T, 0.8 F, 0.7 T with 2 regions: F1 at 0.9 = 2/3, at 0.8 = 1/2, at 0.7 = 4/5
    assert best_f1_threshold([0.9, 0.7], [0.8], 2).threshold == 0.7
    # 0.9 T, 0.8 F, 0.7 F, 0.6 T: F1 at 0.9 = 2/3 = F1 at 0.6 -> the higher one
    assert best_f1_threshold([0.9, 0.6], [0.8, 0.7], 2).threshold == 0.9
    assert best_f1_threshold([0.9], [0.8], 1).threshold == 0.9    # 0.9: F1 1; 0.8: 2/3
    assert best_f1_threshold([0.9], [], 3).f1 == pytest.approx(0.5)
    assert best_f1_threshold([], [0.8, 0.3], 2) is None
    assert best_f1_threshold([], [], 0) is None


def test_target_precision_takes_the_lowest_threshold_reaching_it():
    # precision at 0.9: 1, 0.85: 1/2, 0.8: 2/3, 0.6: 1/2, 0.5: 3/5, 0.3: 1/2
    assert target_precision_threshold(TP, FP, N, 0.6).threshold == 0.5
    assert target_precision_threshold(TP, FP, N, 0.65).threshold == 0.8
    assert target_precision_threshold(TP, FP, N, 0.7).threshold == 0.9
    assert target_precision_threshold([], FP, N, 0.1) is None
    assert target_precision_threshold([0.2], [0.9], 1, 1.0) is None


def test_evidence_rule_and_precedence():
    assert calibrate(TP, FP, N, tasks=2) is None                          # < 3 annotated tasks
    assert calibrate(TP, FP, N, tasks=3).threshold == 0.5
    assert calibrate(TP, FP, N, tasks=3, target_precision=0.7).threshold == 0.9
    assert calibrate(TP, FP, N, tasks=1, min_tasks=1).threshold == 0.5
    assert threshold_in_force(0.4) == (0.4, "default")
    assert threshold_in_force(0.4, calibrated=0.5) == (0.5, "calibrated")
    assert threshold_in_force(0.4, calibrated=0.5, control=0.7) == (0.7, "control")
    assert threshold_in_force(0.4, calibrated=None, control=0.0) == (0.0, "control")


def test_variant_choice_needs_evidence_and_a_strictly_better_mean_ap():
    aps = {"ntt": 0.40, "graph": 0.55, "negatives": 0.50}
    per_class = {"cat": 3, "dog": 2}
    assert choose_variant(aps, 5, per_class)[0] == "graph"
    assert choose_variant(aps, 4, per_class)[0] == "ntt"                  # < 5 annotated tasks
    assert choose_variant(aps, 9, {"cat": 8, "dog": 1})[0] == "ntt"       # a class in < 2 tasks
    assert "dog" in choose_variant(aps, 9, {"cat": 8, "dog": 1})[1]
    assert choose_variant({"ntt": 0.5, "graph": 0.5}, 9, per_class)[0] == "ntt"      # tie
    assert choose_variant({"graph": 0.5, "ntt": None}, 9, per_class)[0] == "graph"
    assert choose_variant({"ntt": None, "graph": None}, 9, per_class)[0] == "ntt"
    assert choose_variant(aps, 9, {})[0] == "ntt"
