"""Point grid, SAM2 point decoding, IoU filter, mask-pooled descriptors, whole proposal step."""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from model.bank import MemoryBank
from model.dino import dino_patch_tokens
from model.options import MethodOptions
from model.preprocess import to_dino_input, to_sam_input
from model.proposals import (build_proposals, compute_proposals, decode_points, encode_image,
                             filter_by_iou, point_grid, pool_descriptors)
from model.types import Proposals


# ------------------------------------------------------------------ point grid
def test_ntt_grid_hand_values_and_reference_order():
    expected = [[0.5, 0.5], [0.5, 512.0], [0.5, 1023.5],
                [512.0, 0.5], [512.0, 512.0], [512.0, 1023.5],
                [1023.5, 0.5], [1023.5, 512.0], [1023.5, 1023.5]]
    grid = point_grid(3, 1024)
    assert grid.dtype == torch.float32
    assert grid.tolist() == expected


def test_ntt_grid_headline_covers_both_axes_with_33px_spacing():
    grid = point_grid(32, 1024)
    assert grid.shape == (1024, 2)
    assert grid[1].tolist() == [0.5, 33.5] and grid[32].tolist() == [33.5, 0.5]
    axis = [0.5 + 33 * k for k in range(32)]
    assert sorted(set(grid[:, 0].tolist())) == axis and sorted(set(grid[:, 1].tolist())) == axis
    assert len({tuple(p) for p in grid.tolist()}) == 1024


def test_amg_grid_is_cell_centres():
    assert point_grid(2, 256, "amg").tolist() == [[64.0, 64.0], [192.0, 64.0], [64.0, 192.0], [192.0, 192.0]]
    with pytest.raises(ValueError, match="unknown point grid"):
        point_grid(2, 256, "random")


# ------------------------------------------------------------------ IoU filter
def test_filter_by_iou_is_strict_and_drops_empty_masks():
    logits = -torch.ones(4, 4, 4)
    logits[0, 0, 0] = logits[1, 1, 1] = logits[2, 2, 2] = 3.0
    logits[3, 3, 3] = 0.0  # a zero logit is not foreground: mask 3 is empty
    iou = torch.tensor([0.3, 0.4, 0.5, 0.9])
    kept_logits, kept_iou = filter_by_iou(logits, iou, 0.4)
    assert kept_iou.tolist() == [0.5]
    assert torch.equal(kept_logits, logits[2:3])
    # the named deviation off: empty masks stay, as in the reference
    kept_logits, kept_iou = filter_by_iou(logits, iou, 0.4, drop_empty=False)
    assert torch.equal(kept_iou, iou[2:]) and torch.equal(kept_logits, logits[2:])


# ------------------------------------------------------------------ descriptors
def _tokens() -> torch.Tensor:
    # [h=2, w=2, D=3]; bilinear 2 -> 4 (align_corners=False) weights per axis:
    # rows [1, 0], [.75, .25], [.25, .75], [0, 1]
    return torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]], [[0, 0, 1.0], [1.0, 1.0, 1.0]]])


def test_pool_descriptors_hand_computed_means():
    logits = -torch.ones(5, 4, 4)
    logits[0, 0, 0] = 2.0           # pixel (0, 0) = t00
    logits[0, 3, 3] = 0.0           # not > 0
    logits[1] = 1.0                 # whole map: mean of the 4 tokens
    logits[2, 0, :] = 1.0           # top row: (t00 + t01) / 2
    logits[3, 1, 2] = 1.0           # .75*.25 t00 + .75*.75 t01 + .25*.25 t10 + .25*.75 t11
    got = pool_descriptors(_tokens(), logits)           # mask 4 is empty
    s2, s3 = math.sqrt(2), math.sqrt(3)
    v3 = torch.tensor([0.375, 0.75, 0.25])
    expected = torch.stack([torch.tensor([1.0, 0, 0]), torch.tensor([1 / s3] * 3),
                            torch.tensor([1 / s2, 1 / s2, 0]), v3 / v3.norm(), torch.zeros(3)])
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(pool_descriptors(_tokens(), logits, chunk=2), got)


def test_build_proposals_from_hand_made_decoder_outputs(small_opts):
    logits = -torch.ones(3, 4, 4)
    logits[0] = 1.0
    logits[1, 0, 0] = 1.0
    logits[2, 0, :] = 1.0
    iou = torch.tensor([0.9, 0.2, 0.8])
    props = build_proposals(logits, iou, _tokens(), (30, 40), replace(small_opts, iou_threshold=0.4))
    assert isinstance(props, Proposals) and len(props) == 2 and props.image_size == (30, 40)
    assert torch.equal(props.logits, logits[[0, 2]])
    torch.testing.assert_close(props.iou, torch.tensor([0.9, 0.8]))
    torch.testing.assert_close(props.descriptors, pool_descriptors(_tokens(), logits[[0, 2]]))
    assert {t.dtype for t in (props.logits, props.iou, props.descriptors)} == {torch.float32}


# ------------------------------------------------------------------ SAM2 decoding
@pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:FutureWarning")
def test_decode_points_matches_sam2_predictor_best_of_three(sam_t):
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    state = encode_image(sam_t, torch.rand(1, 3, 256, 256))
    points = point_grid(3, 256)
    logits, iou = decode_points(sam_t, state, points, batch_size=4)  # 4 + 4 + 1: remainder kept
    assert logits.shape == (9, 64, 64) and iou.shape == (9,)

    predictor = SAM2ImagePredictor(sam_t)
    predictor._bb_feat_sizes = [(64, 64), (32, 32), (16, 16)]
    predictor._features = {"image_embed": state.image_embed, "high_res_feats": state.high_res_feats}
    predictor._orig_hw = [(256, 256)]
    predictor._is_image_set = True
    with torch.inference_mode():
        _, ref_iou, ref_lowres = predictor._predict(points[:, None, :], torch.ones(9, 1, dtype=torch.int32),
                                                    multimask_output=True)
    best = ref_iou.argmax(dim=1)
    rows = torch.arange(9)
    torch.testing.assert_close(iou, ref_iou[rows, best])
    torch.testing.assert_close(logits.clamp(-32, 32), ref_lowres[rows, best])  # predictor clamps
    one_batch = decode_points(sam_t, state, points, batch_size=64)
    torch.testing.assert_close(one_batch[0], logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(one_batch[1], iou, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ whole step
@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)


def test_compute_proposals_smoke_and_serialisation(sam_t, dino_s, small_opts, image):
    props = compute_proposals(sam_t, dino_s, image, small_opts)
    assert 1 <= len(props) <= 4 and props.image_size == (96, 128)
    assert props.logits.shape == (len(props), 64, 64) and props.descriptors.shape == (len(props), 384)
    assert {t.dtype for t in (props.logits, props.iou, props.descriptors)} == {torch.float32}
    assert all(torch.isfinite(t).all() for t in (props.logits, props.iou, props.descriptors))
    assert bool((props.iou > small_opts.iou_threshold).all())
    assert bool((props.logits > 0).flatten(1).any(dim=1).all())
    torch.testing.assert_close(props.descriptors.norm(dim=1), torch.ones(len(props)))

    back = Proposals.from_bytes(props.to_bytes())
    assert back.image_size == (96, 128)
    assert torch.equal(back.logits > 0, props.logits > 0)
    assert torch.equal(back.iou, props.iou) and torch.equal(back.descriptors, props.descriptors)


def test_compute_proposals_is_the_documented_pipeline(sam_t, dino_s, small_opts, image):
    x = to_sam_input(image, 256)
    with torch.inference_mode():
        tokens = dino_patch_tokens(dino_s, to_dino_input(x, 112))[0]
    logits, iou = decode_points(sam_t, encode_image(sam_t, x), point_grid(2, 256), 64)
    expected = build_proposals(logits, iou, tokens, (96, 128), small_opts)
    got = compute_proposals(sam_t, dino_s, image, replace(small_opts, bf16=True))  # bf16: CUDA only
    torch.testing.assert_close(got.logits, expected.logits)
    torch.testing.assert_close(got.descriptors, expected.descriptors)
    torch.testing.assert_close(got.iou, expected.iou)


def test_compute_proposals_checks_sam_input_size(sam_t, dino_s, small_opts, image):
    with pytest.raises(ValueError, match="sam_image_size=1024"):
        compute_proposals(sam_t, dino_s, image, replace(small_opts, sam_image_size=1024))


# ------------------------------------------------------------------ compiled decoder (the default)
def _state(sam_t):
    image = (np.random.default_rng(1).random((48, 64, 3)) * 255).astype(np.uint8)
    return encode_image(sam_t, to_sam_input(image, 256), orig_hw=(48, 64))


def test_compiled_decoder_is_built_once_and_within_the_method_tolerance(sam_t, dino_s, small_opts, image):
    """opts.compile_decoder (on by default): the torch.compile'd decoder really runs (no silent
    fallback) and stays within the method's tolerance of the eager fp32 decoder: low-res logits
    within 1e-4, the same proposals past the IoU filter, the same detections. It is compiled once
    per model and is not part of the proposal cache key."""
    from model.matching import match
    from model.proposals import _COMPILED, mask_decoder

    state, pts = _state(sam_t), point_grid(3, 256)
    eager_logits, eager_iou = decode_points(sam_t, state, pts, 4)
    logits, iou = decode_points(sam_t, state, pts, 4, compiled=True)
    assert _COMPILED[sam_t] is not sam_t.sam_mask_decoder  # the compiled twin ran, no fallback
    assert mask_decoder(sam_t, True) is mask_decoder(sam_t, True) is not sam_t.sam_mask_decoder
    assert mask_decoder(sam_t, False) is sam_t.sam_mask_decoder
    assert (logits - eager_logits).abs().max() <= 1e-4 and (iou - eager_iou).abs().max() <= 1e-4
    assert torch.equal(iou > 0.4, eager_iou > 0.4)
    # the whole proposal step, then matching: same proposals, same detections
    opts = replace(small_opts, points_per_side=3, point_batch_size=4, iou_threshold=0.4)
    eager = compute_proposals(sam_t, dino_s, image, replace(opts, compile_decoder=False))
    compiled = compute_proposals(sam_t, dino_s, image, replace(opts, compile_decoder=True))
    assert len(eager) > 0 and len(compiled) == len(eager) and torch.equal(compiled.iou > 0.4, eager.iou > 0.4)
    assert (compiled.logits - eager.logits).abs().max() <= 1e-4
    bank = MemoryBank()
    for k, d in enumerate(eager.descriptors[:3]):
        bank.add(f"c{k % 2}", f"r{k}", d.numpy())
    a, b = match(eager, bank, opts), match(compiled, bank, opts)
    assert a.labels == b.labels and np.array_equal(a.boxes, b.boxes)
    np.testing.assert_allclose(a.scores, b.scores, rtol=0, atol=1e-5)
    assert MethodOptions().compile_decoder and MethodOptions().cache_key() == \
        MethodOptions(compile_decoder=False).cache_key()


def test_failed_compile_falls_back_to_eager(sam_t, monkeypatch, caplog):
    """No compiler on the box (or an unsupported GPU): predictions go on with the eager decoder."""
    import model.proposals as proposals

    class Broken(torch.nn.Module):
        def forward(self, **kwargs):
            raise RuntimeError("InductorError: no C compiler found")

    fake: dict = {sam_t: Broken()}
    monkeypatch.setattr(proposals, "_COMPILED", fake)
    state, pts = _state(sam_t), point_grid(2, 256)
    logits, iou = decode_points(sam_t, state, pts, 2, compiled=True)
    eager_logits, eager_iou = decode_points(sam_t, state, pts, 2)
    assert torch.equal(logits, eager_logits) and torch.equal(iou, eager_iou)
    assert fake[sam_t] is sam_t.sam_mask_decoder
    assert "compiled SAM2 mask decoder failed (RuntimeError: InductorError: no C compiler found)" in caplog.text
