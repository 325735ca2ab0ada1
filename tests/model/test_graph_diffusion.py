"""Graph-diffusion rescoring (docs/method.md, "Graph diffusion"): the worked example by hand, the
row-normalised variant by hand, labels kept apart, and the variant wired into matching."""
from __future__ import annotations

from dataclasses import replace

import cv2
import numpy as np
import pytest
import torch

from model.graph_diffusion import diffusion_decay, feature_masks, graph_diffusion
from model.matching import match, match_with_stats
from model.options import MethodOptions
from model.types import Proposals
from tests.model.test_matching import assert_same, cat_bank, cat_dog_bank, props, random_scene, square, unit


def pixels(n: int, *spans: tuple[int, int]) -> torch.Tensor:
    """Binary 1-D masks of n pixels, one per inclusive span."""
    m = torch.zeros(len(spans), n, dtype=torch.bool)
    for i, (a, b) in enumerate(spans):
        m[i, a:b + 1] = True
    return m


WORKED = pixels(10, (0, 5), (0, 2), (4, 9))      # m1 inside m0, m2 shares pixels 4-5 with m0
CHAIN = pixels(10, (0, 7), (0, 3), (2, 5))       # m2 overlaps both earlier masks: rows sum to 1.5
SCORES = torch.tensor([0.9, 0.8, 0.6])


def test_worked_example_as_released():
    r = graph_diffusion(WORKED, torch.zeros(3, dtype=torch.long), alpha=0.3, steps=30)
    assert torch.allclose(r, torch.tensor([0.0, 0.7, 0.233333]), atol=1e-5)
    new = diffusion_decay(SCORES, r, lam=0.5)
    assert torch.allclose(new, torch.tensor([0.9, 0.438178, 0.525357]), atol=1e-5)
    one_step = graph_diffusion(WORKED, torch.zeros(3, dtype=torch.long), alpha=0.3, steps=1)
    assert torch.allclose(one_step, torch.tensor([0.0, 0.8, 0.266667]), atol=1e-5)


def test_unnormalised_and_row_normalised_transition_by_hand():
    """CHAIN: A row 2 = [1, 0.5, 0]; p = [0, 1, 1].
    P = A:           r -> [0, .8, .85] -> [0, .7, .82] -> [0, .7, .805] (then unchanged)
    P = A / rowsum:  r -> [0, .8, .8]  -> [0, .7, .78] -> [0, .7, .77]"""
    labels = torch.zeros(3, dtype=torch.long)
    raw = graph_diffusion(CHAIN, labels)
    norm = graph_diffusion(CHAIN, labels, normalise=True)
    assert torch.allclose(raw, torch.tensor([0.0, 0.7, 0.805]), atol=1e-5)
    assert torch.allclose(norm, torch.tensor([0.0, 0.7, 0.77]), atol=1e-5)
    assert torch.allclose(diffusion_decay(SCORES, raw), torch.tensor([0.9, 0.438178, 0.264953]), atol=1e-5)
    assert torch.allclose(diffusion_decay(SCORES, norm), torch.tensor([0.9, 0.438178, 0.287750]), atol=1e-5)
    # the worked example cannot tell them apart: its only overlapping rows have one entry each
    assert torch.allclose(graph_diffusion(WORKED, labels, normalise=True), graph_diffusion(WORKED, labels))


def test_overlap_above_one_zeroes_the_score():
    """Unnormalised rows can sum above 1, so r > 1 happens: the decay factor is clipped at 0.
    Four equal masks: r = [0, .7, .3 · .7 + .7 = .91, .3 · (.7 + .91) + .7 = 1.183]."""
    r = graph_diffusion(pixels(4, *[(0, 3)] * 4), torch.zeros(4, dtype=torch.long))
    assert torch.allclose(r, torch.tensor([0.0, 0.7, 0.91, 1.183]), atol=1e-5)
    assert torch.equal(diffusion_decay(torch.ones(4), r)[2:] > 0, torch.tensor([True, False]))
    normalised = graph_diffusion(pixels(4, *[(0, 3)] * 4), torch.zeros(4, dtype=torch.long), normalise=True)
    assert (normalised <= 1).all()


def test_labels_are_independent_and_stop_on_their_own():
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    masks = torch.cat([WORKED, CHAIN])[[0, 3, 1, 4, 5, 2]]        # interleaved, overlapping across labels
    r = graph_diffusion(masks, labels)
    assert torch.equal(r[labels == 0], graph_diffusion(WORKED, torch.zeros(3, dtype=torch.long)))
    assert torch.equal(r[labels == 1], graph_diffusion(CHAIN, torch.zeros(3, dtype=torch.long)))
    assert torch.equal(graph_diffusion(WORKED[:1], torch.zeros(1, dtype=torch.long)), torch.zeros(1))


def test_feature_masks_resize_like_the_release():
    """The release resizes each binary mask with cv2.resize (bilinear) and keeps > 0.5."""
    g = torch.Generator().manual_seed(3)
    y, x = torch.meshgrid(torch.arange(64) + 0.5, torch.arange(64) + 0.5, indexing="ij")
    masks = []
    for _ in range(30):
        cx, cy, rx, ry = (torch.rand(4, generator=g) * torch.tensor([64, 64, 20, 20]) + torch.tensor([0, 0, 1, 1])).tolist()
        masks.append(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 < 1)
    masks = torch.stack(masks)
    for size in ((37, 37), (16, 16), (23, 40)):
        ours = feature_masks(masks, size).numpy()
        theirs = np.stack([cv2.resize(m.numpy().astype(np.float32), size[::-1]) > 0.5 for m in masks])
        assert np.array_equal(ours, theirs) and ours.any()


# --------------------------------------------------------------------------- wired into matching
GRAPH = MethodOptions(merge="graph", dino_image_size=224)   # 16×16 feature grid: 4 low-res px per cell


def worked_proposals() -> Proposals:
    """The worked example in 2-D: cells of 4×4 low-res pixels, one row of cells; NMS order by SAM
    IoU = the example's rank order; cosines to the cat prototype 0.9, 0.8, 0.6."""
    cells = lambda a, b: square(4 * a, 0, 4 * b + 3, 3)             # noqa: E731
    descs = [unit(s, 0, (1 - s * s) ** 0.5) for s in (0.9, 0.8, 0.6)]
    return props([cells(0, 5), cells(0, 2), cells(4, 9)], [0.9, 0.8, 0.7], descs)


@pytest.mark.parametrize("lazy", [True, False])
def test_graph_merge_in_matching_gives_the_worked_example(lazy):
    p = worked_proposals()
    det = match(p, cat_bank(), replace(GRAPH, lazy_topk=lazy))
    assert det.labels == ["cat"] * 3
    assert np.allclose(det.scores, [0.9, 0.525357, 0.438178], atol=1e-5)
    assert det.boxes.tolist() == [[0, 0, 23, 3], [16, 0, 39, 3], [0, 0, 11, 3]]
    soft = match(p, cat_bank(), replace(GRAPH, merge="soft"))              # the method's soft merge differs
    assert not np.allclose(soft.scores, det.scores, atol=1e-3)
    assert_same(match(Proposals.from_bytes(p.to_bytes()), cat_bank(), GRAPH), det)   # packed masks


def test_graph_merge_keeps_labels_apart_and_caps_at_k():
    p = worked_proposals()
    p.descriptors[1] = unit(0.1, 0.8)                   # m1 becomes a dog: it neither decays nor is decayed
    det = match(p, cat_dog_bank(), GRAPH)
    assert det.labels == ["dog", "cat", "cat"]
    # cats m0, m2 alone: A = [[0, 0], [2/6, 0]], p = [0, 1/3] -> r = [0, 0.7/3]
    assert np.allclose(det.scores, [0.8 / np.linalg.norm([0.1, 0.8]), 0.9, 0.6 * np.sqrt(1 - 0.7 / 3)],
                       atol=1e-5)
    assert np.allclose(match(p, cat_dog_bank(), GRAPH, max_detections=2).scores, det.scores[:2])


@pytest.mark.parametrize("merge", ["graph", "graph-normalised"])
def test_graph_lazy_output_equals_eager(merge):
    p, bank = random_scene(7, n=120, classes=4, size=(150, 200))
    opts = replace(GRAPH, merge=merge, dino_image_size=518)
    lazy, s_lazy = match_with_stats(p, bank, opts, max_detections=5)
    eager, s_eager = match_with_stats(p, bank, replace(opts, lazy_topk=False), max_detections=5)
    assert len(lazy) == 5
    assert_same(lazy, eager)
    assert s_lazy.upsampled < s_eager.upsampled == s_eager.candidates
    above = match(p, bank, opts, score_threshold=float(lazy.scores[2]), max_detections=5)
    assert np.array_equal(above.scores, lazy.scores[:3]) and above.labels == lazy.labels[:3]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("merge", ["graph", "graph-normalised"])
def test_graph_merge_on_cuda_matches_cpu(merge):
    p, bank = random_scene(31, size=(480, 640))
    opts = replace(GRAPH, merge=merge, dino_image_size=518)
    cpu = match(p, bank, opts, max_detections=5)
    gpu = match(p.to("cuda"), bank, opts, max_detections=5)
    assert gpu.labels == cpu.labels and np.allclose(gpu.scores, cpu.scores, atol=1e-5)
