"""Resampling, reference crop geometry, patch weights, reference descriptors, box -> mask."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from model.options import MethodOptions
from model.preprocess import (IMAGENET_MEAN, IMAGENET_STD, image_to_tensor, imagenet_normalize,
                              to_dino_input, to_sam_input)
from model.proposals import encode_image
from model.reference import (box_to_mask, mask_bbox_xywh, patch_weights, reference_crop_box,
                             reference_descriptor)

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


class PatchMeanEncoder(nn.Module):
    """Stand-in for DINOv2: one token per 14×14 patch = the patch's mean RGB, plus a CLS token."""

    num_prefix_tokens = 1
    patch_embed = SimpleNamespace(patch_size=(14, 14))

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the module a device

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        tokens = F.avg_pool2d(x, 14).flatten(2).transpose(1, 2)
        return torch.cat([torch.full_like(tokens[:, :1], 99.0), tokens], dim=1)


OPTS = MethodOptions(dino_image_size=112)


# ------------------------------------------------------------------ preprocessing
def test_to_sam_input_is_pil_bicubic_without_aspect_ratio():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (6, 10, 3), dtype=np.uint8)
    x = to_sam_input(image, 8)
    assert x.shape == (1, 3, 8, 8) and x.dtype == torch.float32
    expected = np.asarray(Image.fromarray(image).resize((8, 8), Image.BICUBIC)).astype(np.float32) / 255
    np.testing.assert_array_equal(x[0].permute(1, 2, 0).numpy(), expected)
    flat = to_sam_input(np.full((5, 9, 3), 51, np.uint8), 16)
    torch.testing.assert_close(flat, torch.full((1, 3, 16, 16), 0.2))
    with pytest.raises(ValueError, match="uint8"):
        to_sam_input(image.astype(np.float32), 8)


def test_imagenet_normalize_hand_values():
    x = torch.stack([torch.full((2, 2), v) for v in (0.485, 1.0, 0.0)])[None]
    y = imagenet_normalize(x)
    torch.testing.assert_close(y[0, 0], torch.zeros(2, 2))
    torch.testing.assert_close(y[0, 1], torch.full((2, 2), (1 - 0.456) / 0.224))
    torch.testing.assert_close(y[0, 2], torch.full((2, 2), -0.406 / 0.225))


def test_to_dino_input_is_torch_bicubic_then_normalise():
    x = torch.rand(1, 3, 40, 30)
    same = to_dino_input(x[..., :28, :28], 28)
    torch.testing.assert_close(same, (x[..., :28, :28] - MEAN) / STD)  # bicubic at the same size = identity
    y = to_dino_input(x, 28)
    ref = F.interpolate(x, size=(28, 28), mode="bicubic", align_corners=False)
    torch.testing.assert_close(y, (ref - MEAN) / STD)
    assert not torch.allclose(to_dino_input(x, 28, antialias=True), y)


# ------------------------------------------------------------------ crop geometry
@pytest.mark.parametrize("bbox, size, expected", [
    # x1,y1,x2,y2 = 10,20,40,60; side 1.2*40 = 48 around (25, 40)
    ((10, 20, 30, 40), (200, 200), (1, 16, 49, 64)),
    # fractional box: corners truncated to 10,5,31,15; side 25.2 around (20.5, 10); top clipped
    ((10.7, 5.2, 20.9, 10.1), (200, 200), (7, 0, 33, 22)),
    # top-left corner: int(-1) = -1 and int(-3.5) = -3 clip to 0
    ((0, 0, 10, 5), (100, 100), (0, 0, 11, 8)),
    # bottom-right corner: 101 and 103 clip to the image size
    ((90, 95, 10, 5), (100, 100), (89, 91, 100, 100)),
    # one pixel: side 1.2 around (50.5, 50.5) -> int(49.9), int(51.1)
    ((50, 50, 1, 1), (100, 100), (49, 49, 51, 51)),
])
def test_reference_crop_box(bbox, size, expected):
    assert reference_crop_box(bbox, size[0], size[1], 0.2) == expected


def test_mask_bbox_is_coco_extent():
    mask = np.zeros((10, 12), bool)
    mask[2:5, 3:7] = True
    assert mask_bbox_xywh(mask) == (3.0, 2.0, 4.0, 3.0)


def test_patch_weights_sample_top_left_pixel_of_each_patch():
    mask = torch.zeros(28, 28)
    mask[1:14, 1:14] = 1.0  # all of patch (0, 0) except its top-left pixel
    mask[0, 14] = 0.7       # only the top-left pixel of patch (0, 1)
    mask[14, 0] = 0.3       # only the top-left pixel of patch (1, 0), soft value kept
    torch.testing.assert_close(patch_weights(mask, (2, 2)), torch.tensor([[0.0, 0.7], [0.3, 0.0]]))


# ------------------------------------------------------------------ reference descriptor
def test_reference_descriptor_of_uniform_image_is_its_normalised_colour():
    image = np.full((100, 120, 3), (128, 64, 200), np.uint8)
    mask = np.zeros((100, 120), bool)
    mask[30:70, 10:50] = True
    got = reference_descriptor(PatchMeanEncoder(), image, mask, OPTS)
    expected = [(128 / 255 - 0.485) / 0.229, (64 / 255 - 0.456) / 0.224, (200 / 255 - 0.406) / 0.225]
    assert got.dtype == np.float32 and got.shape == (3,)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_reference_descriptor_is_soft_weighted_mean_of_patch_tokens():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (100, 120, 3), dtype=np.uint8)
    mask = np.zeros((100, 120), bool)
    mask[20:50, 30:80] = True  # bbox (30, 20, 50, 30): side 60 around (55, 35)
    x0, y0, x1, y1 = reference_crop_box(mask_bbox_xywh(mask), 120, 100, 0.2)
    assert (x0, y0, x1, y1) == (25, 5, 85, 65)
    crop = torch.from_numpy(image[5:65, 25:85]).permute(2, 0, 1)[None].double() / 255
    crop = F.interpolate(crop.float(), size=(112, 112), mode="bicubic", align_corners=False)
    tokens = F.avg_pool2d((crop - MEAN) / STD, 14)[0]  # [3, 8, 8]
    soft = F.interpolate(torch.from_numpy(mask[5:65, 25:85])[None, None].float(), size=(112, 112),
                         mode="bilinear", align_corners=False)[0, 0]
    num, den = torch.zeros(3), 0.0
    for i in range(8):
        for j in range(8):
            w = float(soft[14 * i, 14 * j])
            num += w * tokens[:, i, j]
            den += w
    assert 0 < den < 64  # soft edges: some samples are partial
    got = reference_descriptor(PatchMeanEncoder(), image, mask, OPTS)
    np.testing.assert_allclose(got, (num / den).numpy(), rtol=1e-5, atol=1e-6)


def test_reference_descriptor_real_vit_end_to_end(dino_s):
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (90, 130, 3), dtype=np.uint8)
    mask = np.zeros((90, 130), bool)
    mask[10:80, 40:70] = True
    got = reference_descriptor(dino_s, image, mask, OPTS)
    assert got.dtype == np.float32 and got.shape == (384,)
    assert np.isfinite(got).all() and np.abs(got).sum() > 0


def test_reference_descriptor_none_for_empty_or_missed_masks(caplog):
    image = np.zeros((100, 100, 3), np.uint8)
    with caplog.at_level(logging.WARNING, logger="model.reference"):
        assert reference_descriptor(PatchMeanEncoder(), image, np.zeros((100, 100), bool), OPTS) is None
    assert "empty" in caplog.text
    # two pixels: crop (2, 2, 98, 98), 96 px -> 112; the patch samples read crop pixels 0 and
    # 12i - 0.07 (rows and columns 11..12, 23..24, ..., 83..84): never 8 or 87
    mask = np.zeros((100, 100), bool)
    mask[10, 10] = mask[89, 89] = True
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="model.reference"):
        assert reference_descriptor(PatchMeanEncoder(), image, mask, OPTS) is None
    assert "misses every" in caplog.text
    with pytest.raises(ValueError, match="does not match"):
        reference_descriptor(PatchMeanEncoder(), image, np.ones((10, 10), bool), OPTS)


def test_image_to_tensor_keeps_size_and_scale():
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    x = image_to_tensor(image)
    assert x.shape == (1, 3, 2, 3) and x.dtype == torch.float32
    assert float(x[0, 2, 1, 2]) == pytest.approx(image[1, 2, 2] / 255)


# ------------------------------------------------------------------ box -> mask
@pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:FutureWarning")
def test_box_to_mask_matches_sam2_image_predictor(sam_t):
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    state = encode_image(sam_t, to_sam_input(image, 256), orig_hw=(96, 128))
    box = (20.0, 10.5, 90.0, 70.0)
    mine = box_to_mask(sam_t, state, box)
    assert mine.shape == (96, 128) and mine.dtype == bool and 0 < mine.sum() < mine.size

    predictor = SAM2ImagePredictor(sam_t)
    predictor._bb_feat_sizes = [(64, 64), (32, 32), (16, 16)]
    predictor._features = {"image_embed": state.image_embed + sam_t.no_mem_embed.reshape(1, -1, 1, 1),
                           "high_res_feats": state.high_res_feats}
    predictor._orig_hw = [(96, 128)]
    predictor._is_image_set = True
    with torch.inference_mode():
        masks, _, _ = predictor.predict(box=np.array(box), multimask_output=False)
    np.testing.assert_array_equal(mine, masks[0] > 0.5)
