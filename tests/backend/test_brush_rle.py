"""backend.regions.brush_rle must give exactly the SDK's brush RLE (mask2rle / encode_rle), only faster."""
import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle, encode_rle, mask2rle

from backend.regions.brush_rle import encode_values, mask_to_ls_rle
from backend.regions.label_config import parse_label_config
from backend.regions.results import detections_to_regions
from model.types import Detections
from tests.backend.fixtures import CONFIG_XML


def sdk(mask: np.ndarray) -> list[int]:
    return mask2rle(mask.astype(np.uint8) * 255)


def assert_same(mask: np.ndarray) -> list[int]:
    ours = mask_to_ls_rle(mask)
    assert all(type(v) is int for v in ours)
    assert ours == sdk(mask)
    return ours


def ellipse(H, W, cx, cy, rx, ry):
    yy, xx = np.mgrid[:H, :W]
    return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1


def corner(H, W, y, x):
    m = np.zeros((H, W), bool)
    m[y, x] = True
    return m


SHAPES = [(1, 1), (1, 2), (2, 1), (7, 13), (13, 7), (1, 1000), (1000, 1), (48, 64)]


@pytest.mark.parametrize("shape", SHAPES)
def test_empty_full_and_corner_pixels(shape):
    H, W = shape
    assert_same(np.zeros(shape, bool))
    assert_same(np.ones(shape, bool))
    for y, x in {(0, 0), (0, W - 1), (H - 1, 0), (H - 1, W - 1), (H // 2, W // 2)}:
        assert_same(corner(H, W, y, x))
        assert_same(~corner(H, W, y, x))


@pytest.mark.parametrize("density", [0.001, 0.05, 0.3, 0.5, 0.7, 0.95, 0.999])
@pytest.mark.parametrize("shape", [(7, 13), (1, 1000), (1000, 1), (120, 160)])
def test_random_noise(shape, density):
    rng = np.random.default_rng(int(density * 1000) + shape[0])
    assert_same(rng.random(shape) < density)


@pytest.mark.parametrize("pixels", [1, 2, 3, 4, 5, 63, 64, 65, 127, 128, 255, 256, 16383, 16384,
                                    16385, 32767, 32768, 32769, 40000])
def test_runs_around_the_length_field_limits(pixels):
    # each pixel is 4 values: 2/4/64 px are the 8/16/256-value limits of the 3/4/8-bit length
    # fields, 16384 px the 65536 values of one 16-bit field (longer runs are split)
    for phase in (0, 1):
        period = np.arange(3 * pixels + 5) // pixels
        assert_same(((period + phase) % 2 == 1).reshape(1, -1))
    assert_same(np.ones((1, pixels), bool))
    assert_same(np.pad(np.ones((1, pixels), bool), ((0, 0), (1, 3))))


@pytest.mark.parametrize("length", [1, 2, 3, 7, 8, 9, 15, 16, 17, 255, 256, 257, 65535, 65536,
                                    65537, 65540, 131072, 131073, 140000])
def test_encode_values_matches_sdk_encode_rle(length):
    # the general 8-bit encoder, including runs of 1 (literals) and long runs of any length
    rng = np.random.default_rng(length)
    arr = np.concatenate([rng.integers(0, 3, 20), np.full(length, 255), [7],
                          np.zeros(length), rng.integers(0, 256, 10)]).astype(np.uint8)
    assert encode_values(arr) == encode_rle(arr)


@pytest.mark.parametrize("seed", range(5))
def test_blobs(seed):
    rng = np.random.default_rng(seed)
    H, W = 600, 800
    mask = np.zeros((H, W), bool)
    for _ in range(rng.integers(1, 5)):
        mask ^= ellipse(H, W, rng.uniform(0, W), rng.uniform(0, H), rng.uniform(5, 300), rng.uniform(5, 300))
    ours = assert_same(mask)
    decoded = decode_rle(ours).reshape(H, W, 4)
    np.testing.assert_array_equal(decoded, np.repeat((mask * 255).astype(np.uint8)[:, :, None], 4, axis=2))


@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (60, 80)])
def test_round_trip_through_sdk_decoder(shape):
    mask = np.random.default_rng(1).random(shape) < 0.4
    decoded = decode_rle(mask_to_ls_rle(mask)).reshape(*shape, 4)
    assert (decoded == np.where(mask, 255, 0)[:, :, None]).all()


def test_0_1_and_0_255_inputs_mean_the_same():
    mask = ellipse(30, 40, 20, 15, 10, 8)
    expected = sdk(mask)
    assert mask_to_ls_rle(mask.astype(np.uint8)) == expected
    assert mask_to_ls_rle(mask.astype(np.uint8) * 255) == expected
    assert mask_to_ls_rle(mask.astype(np.int64)) == expected
    with pytest.raises(ValueError):
        mask_to_ls_rle(mask.ravel())


def test_zero_size_mask_is_an_empty_stream():
    # the SDK's encoder fails on it; ours writes the header of zero values
    assert decode_rle(mask_to_ls_rle(np.zeros((0, 5), bool))).shape == (0,)


def test_results_brush_region_is_the_sdk_rle():
    H, W = 96, 128
    crop = ellipse(40, 50, 25, 20, 20, 15)
    crop[5:9, 10:40] = ~crop[5:9, 10:40]
    det = Detections((H, W), np.array([[30, 20, 79, 59]], np.float32), np.array([0.9], np.float32),
                     ["Cat"], [(30, 20, crop)])
    regions = detections_to_regions(det, parse_label_config(CONFIG_XML), score_threshold=None,
                                    polygon_tolerance=1.0)
    brush = next(r for r in regions if r["type"] == "brushlabels")
    assert brush["value"]["format"] == "rle"
    assert brush["value"]["rle"] == sdk(det.mask(0))
