"""Proposals' compact cache encoding: exact where it matters (thresholded full-res masks)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sam2.utils.amg import batched_mask_to_box

from model.types import Detections, Proposals, _sign_boundary, mask_boxes


def _maxpool_boundary(signs: torch.Tensor, r: int) -> torch.Tensor:
    x = signs.float()[:, None]
    k = 2 * r + 1
    dil = F.max_pool2d(x, k, stride=1, padding=r)
    ero = -F.max_pool2d(-x, k, stride=1, padding=r)
    return (dil != ero)[:, 0]


@pytest.mark.parametrize("radius", [1, 2, 4])
def test_boolean_boundary_equals_maxpool_definition(radius: int) -> None:
    g = torch.Generator().manual_seed(radius)
    signs = torch.rand(5, 23, 31, generator=g) > 0.7
    signs[0] = True   # uniform mask: no boundary
    signs[1] = False
    assert torch.equal(_sign_boundary(signs, radius), _maxpool_boundary(signs, radius))
    assert not _sign_boundary(signs, radius)[:2].any()


def _smooth_logits(n: int, side: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 1, 6, 6, generator=g)
    return F.interpolate(base, (side, side), mode="bicubic", align_corners=False)[:, 0] * 5


@pytest.mark.parametrize("size", [(480, 640), (97, 131), (40, 30), (13, 200), (256, 256)])
def test_round_trip_reproduces_full_resolution_masks_exactly(size: tuple[int, int]) -> None:
    logits = _smooth_logits(6, 64, seed=size[0])
    logits[0] = -2.0                      # an all-negative mask
    desc = F.normalize(torch.randn(6, 16), dim=1)
    p = Proposals(logits, torch.rand(6), desc, size, meta={"k": 1})
    q = Proposals.from_bytes(p.to_bytes())
    up = lambda L: F.interpolate(L[:, None], size, mode="bilinear", align_corners=False, antialias=True)[:, 0] > 0
    assert torch.equal(up(p.logits), up(q.logits))
    assert torch.equal(p.logits > 0, q.logits > 0)
    assert torch.equal(p.descriptors, q.descriptors) and torch.equal(p.iou, q.iou)
    assert q.image_size == size and q.meta == {"k": 1}


def test_cached_proposals_decode_single_masks_exactly_and_keep_boxes() -> None:
    """A cache read decodes only the masks a match asks for; each equals the full decode, and the
    stored low-res boxes equal those of the dense logits (empty mask included)."""
    logits = _smooth_logits(9, 64, seed=7)
    logits[4] = -3.0
    p = Proposals(logits, torch.rand(9), F.normalize(torch.randn(9, 16), dim=1), (300, 411))
    q = Proposals.from_bytes(p.to_bytes())
    assert q.lowres_shape == (64, 64) and torch.equal(q.lowres_boxes().long(), p.lowres_boxes().long())
    full = Proposals.from_bytes(p.to_bytes()).logits
    for index in ([3], [8, 0, 4], [5, 5, 1], list(range(9))):
        idx = torch.tensor(index)
        assert torch.equal(q.logits_of(idx), full[idx]), index
    assert torch.equal(q.logits, full) and torch.equal(q.to("cpu").logits_of(torch.tensor([2])), full[[2]])
    with pytest.raises(ValueError):
        Proposals(None, torch.rand(1), torch.rand(1, 4), (4, 4))


def test_empty_proposals_round_trip() -> None:
    p = Proposals(torch.zeros(0, 64, 64), torch.zeros(0), torch.zeros(0, 8), (50, 60))
    q = Proposals.from_bytes(p.to_bytes())
    assert len(q) == 0 and q.logits.shape == (0, 64, 64) and q.descriptors.shape == (0, 8)


def test_smooth_masks_are_compact() -> None:
    logits = _smooth_logits(50, 256, seed=3)
    p = Proposals(logits, torch.rand(50), F.normalize(torch.randn(50, 1024), dim=1), (768, 1024))
    blob = p.to_bytes()
    raw = logits.numel() * 4
    # descriptors (50 x 1024 float32 = 200 KiB) dominate; masks shrink >10x vs raw float32 logits
    assert len(blob) - 50 * 1024 * 4 < raw / 10


def test_corrupt_or_foreign_bytes_raise() -> None:
    with pytest.raises(Exception):
        Proposals.from_bytes(b"not an npz")


def test_detections_mask_from_crop() -> None:
    crop = np.array([[True, False], [True, True]])
    d = Detections((4, 5), np.array([[1, 2, 2, 3]], np.float32), np.array([0.9], np.float32), ["a"], [(1, 2, crop)])
    full = d.mask(0)
    assert full.shape == (4, 5) and full.sum() == 3 and full[2, 1] and full[3, 2] and not full[2, 2]
    assert len(Detections.empty((3, 3))) == 0


def test_mask_boxes_follow_sams_convention() -> None:
    """Inclusive xyxy, [0, 0, 0, 0] for an empty mask: what SAM's batched_mask_to_box gives."""
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(6, 19, 27, generator=g) > 0.97
    masks[0] = False
    masks[1] = True
    masks[2] = False
    masks[2, 18, 26] = True
    assert torch.equal(mask_boxes(masks), batched_mask_to_box(masks))
    assert mask_boxes(masks)[:3].tolist() == [[0, 0, 0, 0], [0, 0, 26, 18], [26, 18, 26, 18]]
    assert mask_boxes(torch.zeros(0, 4, 4, dtype=torch.bool)).shape == (0, 4)


def test_the_method_package_runs_without_importing_sam2() -> None:
    """Types, matching and the mask cache need no SAM2 package (only building the model does),
    and the method package does no networking (scripts/download_checkpoints.py does)."""
    code = ("import sys, model.types, model.matching, model.upsampled, model.bank, model.checkpoints; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sam2', 'requests')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "[]", out.stdout
