"""Interactive segmentation (clicks, boxes) on cached SAM2 image embeddings."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from model.embedding import EmbeddingCache, image_key, state_nbytes
from model.engine import EmbeddingNotCached, Engine, EngineConfig
from model.interactive import segment
from model.preprocess import to_sam_input
from model.proposals import SamImageState, encode_image

from tests.model.conftest import SAM_SIZE


@pytest.fixture(scope="module")
def engine(small_opts) -> Engine:
    return Engine(EngineConfig("sam2.1-t", "dinov2-s", random_weights=True, device="cpu", options=small_opts))


@pytest.fixture
def fresh(engine) -> Engine:
    """The module's engine with an empty embedding cache."""
    engine.embeddings.clear()
    return engine


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def _count_encoder_calls(monkeypatch, sam) -> list[int]:
    calls = [0]
    original = sam.forward_image

    def counted(x):
        calls[0] += 1
        return original(x)

    monkeypatch.setattr(sam, "forward_image", counted)
    return calls


def _spy_prompt_encoder(monkeypatch, sam) -> list[tuple[torch.Tensor, torch.Tensor]]:
    seen = []
    original = sam.sam_prompt_encoder.forward

    def spy(points, boxes, masks):
        seen.append((points[0].clone(), points[1].clone()))
        return original(points=points, boxes=boxes, masks=masks)

    monkeypatch.setattr(sam.sam_prompt_encoder, "forward", spy)
    return seen


# ------------------------------------------------------------------ mask size, prompts
@pytest.mark.parametrize("hw", [(48, 64), (90, 40), (64, 64)])
def test_click_returns_a_mask_at_the_original_size(fresh, hw):
    image = _image(*hw)
    seg = fresh.segment(image, [(hw[1] * 0.5, hw[0] * 0.25, True)])
    assert seg.mask.shape == hw and seg.mask.dtype == bool and isinstance(seg.score, float)


def test_clicks_and_box_reach_the_prompt_encoder_in_the_sam_frame_with_their_labels(fresh, monkeypatch):
    """A positive and a negative click and a box on a non-square image: SAM2's prompt encoder gets
    them scaled to the S×S input (x by S/W, y by S/H), the box corners first with labels 2, 3, then
    the clicks with labels 1 and 0 (SAM2ImagePredictor's order and labels)."""
    h, w = 50, 100
    seen = _spy_prompt_encoder(monkeypatch, fresh.sam)
    fresh.segment(_image(h, w), [(20, 10, True), (80, 40, False)], box=(10, 5, 90, 45))
    (coords, labels), = seen
    sx, sy = SAM_SIZE / w, SAM_SIZE / h
    expected = [[10 * sx, 5 * sy], [90 * sx, 45 * sy], [20 * sx, 10 * sy], [80 * sx, 40 * sy]]
    torch.testing.assert_close(coords, torch.tensor([expected]))
    assert labels.tolist() == [[2, 3, 1, 0]]


def test_a_negative_click_is_honoured(fresh, monkeypatch):
    """Adding a negative click changes what the decoder sees (label 0 at that point) and the mask."""
    image = _image(64, 96)
    seen = _spy_prompt_encoder(monkeypatch, fresh.sam)
    positive = fresh.segment(image, [(30, 20, True)], multimask=False)
    with_negative = fresh.segment(image, [(30, 20, True), (31, 21, False)], multimask=False)
    assert seen[0][1].tolist() == [[1]] and seen[1][1].tolist() == [[1, 0]]
    assert not np.array_equal(positive.mask, with_negative.mask) or positive.score != with_negative.score
    # the same point as positive gives another result than as negative
    as_positive = fresh.segment(image, [(30, 20, True), (31, 21, True)], multimask=False)
    assert not np.array_equal(as_positive.mask, with_negative.mask) or as_positive.score != with_negative.score


def test_segment_is_sam2_image_predictor_on_the_same_features(fresh):
    """Same masks and scores as the official SAM2ImagePredictor.predict (multimask, best by predicted
    IoU as Label Studio's SAM2 example; and single-mask) given the same image features."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    h, w = 40, 72
    image = _image(h, w, seed=3)
    fresh.warm(image)
    state = fresh.embeddings.get(fresh._embedding_key(image, None))
    predictor = SAM2ImagePredictor(fresh.sam)
    no_mem = fresh.sam.no_mem_embed.reshape(1, -1, 1, 1)
    predictor._features = {"image_embed": state.image_embed + no_mem, "high_res_feats": state.high_res_feats}
    predictor._orig_hw, predictor._is_image_set = [(h, w)], True
    prompts = [([(30.0, 12.0, True)], None, True), ([(30.0, 12.0, True), (50.0, 30.0, False)], None, False),
               ([(20.0, 20.0, True)], (5.0, 4.0, 60.0, 35.0), False), ([], (5.0, 4.0, 60.0, 35.0), True)]
    for points, box, multimask in prompts:
        ours = fresh.segment(image, points, box, multimask)
        masks, scores, _ = predictor.predict(
            point_coords=np.array([p[:2] for p in points]) if points else None,
            point_labels=np.array([int(p[2]) for p in points]) if points else None,
            box=np.array(box) if box else None, multimask_output=multimask)
        best = int(np.argmax(scores))
        assert np.array_equal(ours.mask, masks[best].astype(bool)), (points, box, multimask)
        assert ours.score == pytest.approx(float(scores[best]), abs=1e-6)


def test_single_click_asks_for_three_masks_several_prompts_for_one(fresh, monkeypatch):
    seen = []
    original = fresh.sam.sam_mask_decoder.forward

    def spy(**kwargs):
        seen.append(kwargs["multimask_output"])
        return original(**kwargs)

    monkeypatch.setattr(fresh.sam.sam_mask_decoder, "forward", spy)
    image = _image(32, 32)
    fresh.segment(image, [(5, 5, True)])
    fresh.segment(image, [(5, 5, True), (9, 9, False)])
    fresh.segment(image, box=(1, 1, 20, 20))
    fresh.segment(image, [(5, 5, True), (9, 9, False)], multimask=True)
    assert seen == [True, False, False, True]


@pytest.mark.parametrize("points, box, message", [
    ([], None, "a click or a box"),
    ([(float("nan"), 3.0, True)], None, "finite"),
    ([], (10, 10, 5, 20), "x0 <= x1"),
])
def test_bad_prompts_get_a_clear_error(fresh, points, box, message):
    with pytest.raises(ValueError, match=message):
        fresh.segment(_image(32, 32), points, box)


# ------------------------------------------------------------------ embedding reuse
def test_second_click_does_not_recompute_the_embedding(fresh, monkeypatch):
    calls = _count_encoder_calls(monkeypatch, fresh.sam)
    image = _image(48, 64, seed=5)
    fresh.segment(image, [(10, 10, True)], key="sha-a")
    fresh.segment(image, [(30, 20, True), (5, 5, False)], key="sha-a")
    fresh.segment("sha-a", [(40, 40, True)])           # by key alone
    assert calls[0] == 1


def test_proposals_and_warm_fill_the_embedding_cache(fresh, monkeypatch):
    """propose(image, key) leaves the embedding for clicks; warm() computes it once; the proposals
    are the same as without the cache."""
    calls = _count_encoder_calls(monkeypatch, fresh.sam)
    image = _image(40, 56, seed=6)
    props = fresh.propose(image, key="sha-p")
    seg = fresh.segment("sha-p", [(20, 20, True)])
    assert calls[0] == 1 and seg.mask.shape == (40, 56)
    again = fresh.propose(image, key="sha-p")                 # the encoder is not run again
    assert calls[0] == 1 and torch.equal(again.logits, props.logits)
    assert fresh.warm(image, key="sha-w") is True and fresh.warm(image, key="sha-w") is False
    assert calls[0] == 2
    fresh.segment(image, [(1, 1, True)])                      # no key: the pixels' hash is the key
    fresh.propose(image)
    assert calls[0] == 3


def test_an_unknown_key_asks_for_the_image(fresh):
    with pytest.raises(EmbeddingNotCached, match="send the image"):
        fresh.segment("never-seen", [(1, 1, True)])


def test_embedding_key_holds_engine_and_options(fresh):
    image = _image(16, 16)
    key = fresh._embedding_key(image, "abc")
    assert key.startswith(f"{fresh.name}|s{SAM_SIZE}-b0|") and key.endswith("abc")
    assert fresh.with_options(sam_image_size=512)._embedding_key(image, "abc") != key
    assert fresh._embedding_key(image, None).endswith(image_key(image))
    assert image_key(image) != image_key(image.reshape(8, 32, 3))


# ------------------------------------------------------------------ LRU bounds
def _state(nbytes_per_map: int = 1024) -> SamImageState:
    n = nbytes_per_map // 4
    return SamImageState(torch.zeros(n), [torch.zeros(n), torch.zeros(n)], 256, (10, 10))


def test_lru_is_bounded_by_count_and_keeps_the_recently_used():
    cache = EmbeddingCache(max_items=2, max_bytes=10**9)
    a, b, c = _state(), _state(), _state()
    cache.put("a", a)
    cache.put("b", b)
    assert cache.get("a") is a                 # a is now the most recent
    cache.put("c", c)                          # evicts b
    assert "b" not in cache and cache.get("a") is a and cache.get("c") is c and len(cache) == 2


def test_lru_is_bounded_by_bytes():
    one = state_nbytes(_state())
    assert one == 3 * 1024
    cache = EmbeddingCache(max_items=100, max_bytes=2 * one + 10)
    for k in "abc":
        cache.put(k, _state())
    assert list(cache._entries) == ["b", "c"] and cache.nbytes == 2 * one
    cache.put("big", _state(10**6))            # larger than the whole bound: not kept, nothing evicted
    assert "big" not in cache and len(cache) == 2
    cache.put("c", _state())                   # replacing an entry counts its bytes once
    assert cache.nbytes == 2 * one


def test_lru_is_thread_safe():
    cache = EmbeddingCache(max_items=8, max_bytes=10**9)
    states = [_state() for _ in range(4)]

    def work(t: int) -> None:
        for i in range(300):
            cache.put(f"{t}-{i % 16}", states[t])
            cache.get(f"{t}-{(i * 7) % 16}")

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(cache) == 8 and cache.nbytes == 8 * state_nbytes(states[0])


def test_real_embedding_size_is_counted(sam_t):
    state = encode_image(sam_t, to_sam_input(_image(20, 30), SAM_SIZE), orig_hw=(20, 30))
    # [1, 256, S/16, S/16] + [1, 32, S/4, S/4] + [1, 64, S/8, S/8] float32
    s = SAM_SIZE
    assert state_nbytes(state) == 4 * (256 * (s // 16) ** 2 + 32 * (s // 4) ** 2 + 64 * (s // 8) ** 2)


def test_module_segment_needs_a_prompt(sam_t):
    state = encode_image(sam_t, to_sam_input(_image(20, 30), SAM_SIZE), orig_hw=(20, 30))
    with pytest.raises(ValueError):
        segment(sam_t, state)


# ------------------------------------------------------------------ worker start
def test_prepare_compiles_the_decoder_once_at_start(engine):
    """Engine.prepare() (worker start) builds and runs the compiled decoder, so the first prediction
    does not wait for the compile; with compile_decoder off it does nothing."""
    from model.proposals import _COMPILED

    assert engine.prepare() == 0.0
    compiled = engine.with_options(compile_decoder=True, point_batch_size=4)
    assert compiled.prepare() > 0
    twin = _COMPILED[engine.sam]
    assert twin is not engine.sam.sam_mask_decoder       # compiled and ran, no fallback
    compiled.prepare()
    assert _COMPILED[engine.sam] is twin                 # built once per model
