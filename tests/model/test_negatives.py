"""Negatives (docs/method.md, "Negatives"): stored in the bank like references (keyed, grouped,
versioned, serialised, old banks still load), used by matching only when asked, and variants of
matching side by side on one engine."""
from __future__ import annotations

import io
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from model.bank import MemoryBank
from model.engine import Engine, EngineConfig
from model.matching import match, match_with_stats
from model.options import MethodOptions
from tests.model.test_matching import assert_same, props, random_scene, square, unit

OPTS = MethodOptions()
SUPPRESS = replace(OPTS, negatives="suppress")
NEAREST = replace(OPTS, negatives="suppress-nearest")


def e(i: int, dim: int = 4, scale: float = 1.0) -> np.ndarray:
    v = np.zeros(dim, np.float32)
    v[i] = scale
    return v


def bank_with_negatives() -> MemoryBank:
    bank = MemoryBank()
    bank.add("cat", "r1", e(0), group=10)
    bank.add("dog", "r2", e(1), group=11)
    bank.add_negative("cat", "n1", e(2, scale=2.0), group=12)
    bank.add_negative("dog", "n2", e(3), group=12)
    bank.add_negative("cat", "n3", e(3), group=10)
    return bank


# ---------------------------------------------------------------------------------- the bank
def test_negatives_are_keyed_grouped_and_not_references():
    bank = bank_with_negatives()
    assert len(bank) == 2 and bank.classes == ["cat", "dog"] and "n1" not in bank
    assert [n.ref_id for n in bank.negatives()] == ["n1", "n2", "n3"]
    assert [n.ref_id for n in bank.negatives("cat")] == ["n1", "n3"] and bank.negatives("cat")[0].group == "12"
    names, protos = bank.prototypes()
    assert names == ["cat", "dog"] and torch.equal(protos, torch.from_numpy(np.stack([e(0), e(1)])))
    bank.add_negative("dog", "n1", e(0))                    # replace, even into another class
    assert [(n.ref_id, n.class_name) for n in bank.negatives("dog")] == [("n1", "dog"), ("n2", "dog")]
    assert bank.remove_negative("n2") and not bank.remove_negative("n2") and not bank.remove("n1")
    assert bank.remove_group(10) == 2                       # the annotation's reference and its negative
    assert [n.ref_id for n in bank.negatives()] == ["n1"] and bank.classes == ["dog"]
    with pytest.raises(ValueError, match="dimension"):
        bank.add_negative("cat", "n9", np.ones(5))
    with pytest.raises(ValueError, match="non-finite"):
        bank.add_negative("cat", "n9", np.full(4, np.nan))
    only = MemoryBank()
    only.add_negative("cat", "n", e(1))
    assert len(only) == 0 and only.dim == 4 and only.classes == []


def test_version_covers_negatives_and_keeps_old_hashes():
    bank = MemoryBank()
    bank.add("cat", "r1", np.arange(4.0))
    bank.add("dog", "r2", np.ones(4), group=3)
    assert bank.version == "55602ac9e442"                  # computed before negatives existed
    bank.add_negative("cat", "n1", -np.ones(4), group=3)
    with_negative = bank.version
    assert with_negative != "55602ac9e442"
    bank.add_negative("cat", "n1", -np.ones(4), group=4)   # the group is part of the identity
    assert bank.version not in (with_negative, "55602ac9e442")
    bank.add_negative("cat", "n1", -np.ones(4), group=3)
    assert bank.version == with_negative
    bank.remove_group(3)                                    # deleting the annotation
    assert bank.negatives() == [] and len(bank) == 1
    other = MemoryBank()
    other.add_negative("cat", "r1", np.arange(4.0))         # same entry as a negative: another bank
    other.add("dog", "r2", np.ones(4), group=3)
    assert other.version != MemoryBank.from_bytes(bank.to_bytes()).version


def test_serialisation_round_trip_and_backward_compatibility():
    bank = bank_with_negatives()
    again = MemoryBank.from_bytes(bank.to_bytes())
    assert again.version == bank.version and again.to_bytes() == bank.to_bytes()
    assert [(n.ref_id, n.class_name, n.group) for n in again.negatives()] == \
        [("n1", "cat", "12"), ("n2", "dog", "12"), ("n3", "cat", "10")]
    assert np.array_equal(again.negatives("cat")[0].descriptor, e(2, scale=2.0))
    plain = MemoryBank()
    plain.add("cat", "r1", e(0), group=10)
    meta = json.loads(np.load(io.BytesIO(plain.to_bytes()))["meta"].tobytes())
    assert meta["format"] == 1 and "negatives" not in meta   # what readers without negatives expect
    old = io.BytesIO()                                          # written by the code before negatives
    np.savez(old, descriptors=np.stack([e(0)]).astype("<f4"), meta=np.frombuffer(json.dumps(
        {"format": 1, "dim": 4, "refs": [{"ref_id": "r1", "class": "cat", "group": "10"}]}).encode(), np.uint8))
    loaded = MemoryBank.from_bytes(old.getvalue())
    assert loaded.version == plain.version and loaded.negatives() == []


def test_corrupt_negatives_are_refused():
    data = np.load(io.BytesIO(bank_with_negatives().to_bytes()))
    meta = json.loads(data["meta"].tobytes())
    for change in ({"negatives": meta["negatives"][:2]}, {"format": 3},
                   {"negatives": [meta["negatives"][0]] * 3}):
        buf = io.BytesIO()
        np.savez(buf, descriptors=data["descriptors"], negative_descriptors=data["negative_descriptors"],
                 meta=np.frombuffer(json.dumps({**meta, **change}).encode(), np.uint8))
        with pytest.raises(ValueError, match="corrupt memory bank"):
            MemoryBank.from_bytes(buf.getvalue())


# ---------------------------------------------------------------------------------- matching
def cat_dog_bank() -> MemoryBank:
    bank = MemoryBank()
    bank.add("cat", "c1", unit(1).numpy())
    bank.add("dog", "d1", unit(0, 1).numpy())
    bank.add_negative("cat", "toy", unit(0.6, 0, 0.8).numpy(), group="ann-7")   # a removed "cat"
    return bank


def three_regions():
    """A: the removed region again (cos 0.6 to cat, 1 to the negative); B: a real cat (0.995 / 0.68);
    C: looks like the negative, second best class dog (cat 0.5, dog 0.3, negative 0.9)."""
    c = unit(0.5, 0.3, math.sqrt(1 - 0.34))
    return props([square(0, 0, 9, 9), square(20, 0, 29, 9), square(40, 0, 49, 9)], [0.9, 0.8, 0.7],
                 [unit(0.6, 0, 0.8), unit(1, 0, 0.1), c])


def test_suppression_drops_a_proposal_near_a_negative_and_keeps_one_near_the_prototype():
    p, bank = three_regions(), cat_dog_bank()
    off = match(p, bank, OPTS)
    assert off.labels == ["cat", "cat", "cat"]                              # negatives unused by default
    on, stats = match_with_stats(p, bank, SUPPRESS)
    assert on.labels == ["cat", "dog"] and stats.suppressed == 2
    assert on.boxes[:, 0].tolist() == [20, 40]                              # A dropped, C relabelled
    assert np.allclose(on.scores, [off.scores[0], 0.3], atol=1e-6)
    bank.remove_group("ann-7")                                              # annotation deleted
    assert_same(match(p, bank, SUPPRESS), off)


def test_a_proposal_left_without_a_class_suppresses_nothing_in_nms():
    """The removed region (higher SAM IoU) and a real cat covering almost the same box: the NMS
    kept the removed one; with it suppressed, the real cat survives instead of nothing."""
    p = props([square(10, 10, 29, 29), square(11, 10, 29, 30)], [0.9, 0.8], [unit(0.6, 0, 0.8), unit(1, 0, 0.1)])
    bank = cat_dog_bank()
    assert match(p, bank, OPTS).boxes.tolist() == [[10, 10, 29, 29]]
    det = match(p, bank, SUPPRESS)
    assert det.boxes.tolist() == [[11, 10, 29, 30]] and np.allclose(det.scores, [1 / math.sqrt(1.01)])


def test_nearest_reference_rule_differs_from_the_prototype_rule():
    """cat references e0 and e2 (prototype along e0 + e2); the proposal is the e2 reference itself and
    the negative is 0.98 similar to it: nearer than the prototype (0.71), not than its nearest reference (1)."""
    bank = MemoryBank()
    bank.add("cat", "c1", unit(1).numpy())
    bank.add("cat", "c2", unit(0, 0, 1).numpy())
    bank.add_negative("cat", "n", unit(0.2, 0, 1).numpy())
    p = props([square(0, 0, 9, 9)], [0.9], [unit(0, 0, 1)])
    assert len(match(p, bank, SUPPRESS)) == 0
    assert match(p, bank, NEAREST).labels == ["cat"]
    assert np.allclose(match(p, bank, NEAREST).scores, [math.sqrt(0.5)], atol=1e-6)


def test_suppression_without_negatives_or_of_absent_classes_changes_nothing():
    p, bank = random_scene(5, size=(97, 131))
    plain = match(p, bank, OPTS, max_detections=10)
    assert_same(match(p, bank, SUPPRESS, max_detections=10), plain)
    bank.add_negative("no-such-class", "n", p.descriptors[0].numpy())       # class without references
    assert_same(match(p, bank, NEAREST, max_detections=10), plain)


# ---------------------------------------------------------------------------------- engine
@pytest.fixture(scope="module")
def engine() -> Engine:
    """A real Engine (random tiny models: match uses only its device and options)."""
    return Engine(EngineConfig(sam_model="sam2.1-t", dino_model="dinov2-s", random_weights=True, device="cpu",
                               options=MethodOptions(sam_image_size=256, dino_image_size=112)))


def test_engine_matches_variants_side_by_side_on_the_same_proposals_and_cache(engine):
    p, bank = random_scene(41, n=120, classes=4, size=(150, 200))
    names, protos = bank.prototypes()
    bank.add_negative(names[int((p.descriptors[5] @ protos.T).argmax())], "n", p.descriptors[5].numpy())
    own = engine.options
    cache = engine.match_full(p, bank).upsampled
    variants = [replace(engine.options, merge=m, negatives=n) for m in ("soft", "graph", "graph-normalised")
                for n in ("off", "suppress")]
    results = [engine.match(p, bank, masks=cache, options=v) for v in variants]
    for v, det in zip(variants, results):
        assert_same(det, match(p, bank, v))
    assert_same(results[0], engine.match(p, bank))                          # the engine's own options
    assert engine.options is own and len({d.scores.tobytes() for d in results}) == len(results)
    with pytest.raises(ValueError, match="merge must be one of"):
        replace(engine.options, merge="diffusion")
