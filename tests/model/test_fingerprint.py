"""The weights fingerprint: every byte, name, dtype and shape counts; identical across processes."""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import model.checkpoints
from model.checkpoints import weights_fingerprint
from model.dino import build_dino

from .conftest import SAM_SIZE

REPO = Path(__file__).resolve().parents[2]


def small() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))


def test_any_changed_value_name_dtype_or_shape_changes_the_fingerprint():
    base = small()
    fp = weights_fingerprint({"m": base})
    assert len(fp) == model.checkpoints.FINGERPRINT_HEX and fp == weights_fingerprint({"m": copy.deepcopy(base)})

    nudged = copy.deepcopy(base)  # one value of one tensor, by the smallest float32 step
    with torch.no_grad():
        w = nudged[0].weight
        w[1, 2] = torch.nextafter(w[1, 2], torch.tensor(float("inf")))
    buffer = copy.deepcopy(base)  # a buffer (running statistics) is part of the weights too
    buffer[1].running_mean += 0.5
    reshaped = copy.deepcopy(base)  # same bytes, other shape
    reshaped[0].weight = nn.Parameter(base[0].weight.detach().reshape(4, 3).clone())
    others = [weights_fingerprint({"m": nudged}), weights_fingerprint({"m": buffer}),
              weights_fingerprint({"m": reshaped}), weights_fingerprint({"other": base}),
              weights_fingerprint({"m": copy.deepcopy(base).to(torch.bfloat16)})]
    assert len({fp, *others}) == 1 + len(others), others


def test_same_weights_same_fingerprint_in_another_process(sam_t, dino_s):
    fp = weights_fingerprint({"sam": sam_t, "dino": dino_s})
    script = (
        "from model.checkpoints import weights_fingerprint\n"
        "from model.dino import build_dino\n"
        "from model.sam import build_sam\n"
        f"sam = build_sam('sam2.1-t', random_weights=True, device='cpu', image_size={SAM_SIZE})\n"
        "dino = build_dino('dinov2-s', random_weights=True, device='cpu')\n"
        "print(weights_fingerprint({'sam': sam, 'dino': dino}))\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == fp


def test_other_random_weights_other_fingerprint(sam_t, dino_s, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(model.checkpoints, "RANDOM_WEIGHTS_SEED", 1)
    other = build_dino("dinov2-s", random_weights=True, device="cpu")  # same architecture and names
    assert weights_fingerprint({"sam": sam_t, "dino": other}) != weights_fingerprint({"sam": sam_t, "dino": dino_s})
