"""Session fixtures: the real SAM2 / DINOv2 architectures with random weights at small sizes."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub

import pytest
import torch

from model.dino import build_dino
from model.options import MethodOptions
from model.sam import build_sam

torch.set_num_threads(1)

SAM_SIZE = 256  # low-res masks 64x64, image embedding 16x16
DINO_SIZE = 112  # 8x8 patches


@pytest.fixture(scope="session")
def sam_t() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_sam("sam2.1-t", random_weights=True, device="cpu", image_size=SAM_SIZE)


@pytest.fixture(scope="session")
def dino_s() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_dino("dinov2-s", random_weights=True, device="cpu")


@pytest.fixture(scope="session")
def small_opts() -> MethodOptions:
    # iou_threshold 0: random weights predict IoUs anywhere in (0, 1); the eager decoder (compiling
    # costs ~15 s per process; tests/model/test_proposals.py checks the compiled one)
    return MethodOptions(sam_image_size=SAM_SIZE, points_per_side=2, dino_image_size=DINO_SIZE,
                         iou_threshold=0.0, compile_decoder=False)


@pytest.fixture(scope="session")
def sam_t_checkpoint(sam_t, tmp_path_factory) -> str:
    """sam_t's weights in the official SAM2 layout {'model': state_dict}."""
    path = tmp_path_factory.mktemp("ckpt") / "sam2.1_hiera_tiny.pt"
    torch.save({"model": sam_t.state_dict()}, path)
    return str(path)
