"""End-to-end CLI run on a generated COCO dataset (random-weight small models: AP is noise, but the
files must be valid and the evaluation must run)."""
from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from model.bank import MemoryBank
from model import engine as engine_module
from model.cli import main

SMALL = ["--sam", "sam2.1-t", "--dino", "dinov2-s", "--random-weights", "--device", "cpu",
         "--sam-image-size", "256", "--dino-image-size", "112", "--points-per-side", "2"]
ROOT = Path(__file__).resolve().parents[2]


def _coco(tmp: Path, name: str, n_images: int, seed: int, boxes_only: bool = False) -> Path:
    rng = np.random.default_rng(seed)
    images, anns = [], []
    (tmp / "images").mkdir(exist_ok=True)
    for i in range(1, n_images + 1):
        H, W = 72, 96
        arr = np.full((H, W, 3), 235, np.uint8)
        x0, y0 = int(rng.integers(4, 40)), int(rng.integers(4, 30))
        w, h = 30, 24
        cat = 1 + (i % 2)
        arr[y0:y0 + h, x0:x0 + w] = (200, 30, 30) if cat == 1 else (30, 30, 200)
        fname = f"{name}_{i}.png"
        Image.fromarray(arr).save(tmp / "images" / fname)
        images.append({"id": i, "file_name": fname, "height": H, "width": W})
        mask = np.zeros((H, W), np.uint8)
        mask[y0:y0 + h, x0:x0 + w] = 1
        ann = {"id": 100 * seed + i, "image_id": i, "category_id": cat, "bbox": [x0, y0, w, h],
               "area": w * h, "iscrowd": 0}
        if not boxes_only:
            rle = mask_utils.encode(np.asfortranarray(mask))
            ann["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
        anns.append(ann)
    cats = [{"id": 1, "name": "red"}, {"id": 2, "name": "blue"}]
    path = tmp / f"{name}.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


def _run(*args: str) -> subprocess.CompletedProcess:
    """Run the CLI in-process (models are built per call, as a user's run would)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse usage errors
            code = int(exc.code or 0)
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def test_cli_help_as_a_module() -> None:
    out = subprocess.run([sys.executable, "-m", "model", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "build-bank" in out.stdout and "predict" in out.stdout


def test_cli_bank_predict_eval(tmp_path: Path) -> None:
    refs = _coco(tmp_path, "ref", 2, seed=1)
    gt = _coco(tmp_path, "tgt", 2, seed=2)
    bank_file = tmp_path / "bank.npz"
    out = _run("build-bank", "--refs", str(refs), "--images", str(tmp_path / "images"), "--out", str(bank_file),
               *SMALL)
    assert out.returncode == 0, out.stderr
    bank = MemoryBank.load(bank_file)
    assert sorted(bank.classes) == ["blue", "red"] and len(bank) == 2
    results = tmp_path / "results.json"
    out = _run("predict", "--bank", str(bank_file), "--refs", str(refs), "--images", str(tmp_path / "images"),
               "--out", str(results), "--gt", str(gt), *SMALL)
    assert out.returncode == 0, out.stderr
    assert "bbox AP" in out.stdout and "segm AP" in out.stdout
    dets = json.loads(results.read_text())
    for d in dets:
        assert d["image_id"] in (1, 2) and d["category_id"] in (1, 2)
        assert 0 < d["score"] <= 1 and len(d["bbox"]) == 4
        assert mask_utils.decode(d["segmentation"]).shape == (72, 96)
    out = _run("eval", "--gt", str(gt), "--results", str(results))
    assert out.returncode == 0 and "segm AP" in out.stdout


def test_cli_box_only_references_go_through_sam2_box_prompts(tmp_path: Path, monkeypatch) -> None:
    refs = _coco(tmp_path, "ref", 1, seed=3, boxes_only=True)
    ann = json.loads(refs.read_text())["annotations"][0]
    calls = []
    real = engine_module.box_to_mask

    def spy(sam, state, box):
        calls.append(tuple(box))
        mask = real(sam, state, box)           # the real SAM2 box prompt (random weights: noise)
        assert mask.shape == (72, 96) and mask.dtype == bool
        x0, y0, x1, y1 = (int(v) for v in box)
        out = np.zeros_like(mask)
        out[y0:y1, x0:x1] = True               # a known mask, so a descriptor must come out
        return out

    monkeypatch.setattr(engine_module, "box_to_mask", spy)
    out = _run("build-bank", "--refs", str(refs), "--images", str(tmp_path / "images"),
               "--out", str(tmp_path / "b.npz"), *SMALL)
    assert out.returncode == 0, out.stderr
    x, y, w, h = ann["bbox"]
    assert calls == [(x, y, x + w, y + h)]
    bank = MemoryBank.load(tmp_path / "b.npz")
    assert len(bank) == 1 and f"ann:{ann['id']}" in bank
    assert np.isfinite(bank.refs(bank.classes[0])[0].descriptor).all()


def test_cli_bad_checkpoint_is_one_clear_line(tmp_path: Path) -> None:
    refs = _coco(tmp_path, "ref", 1, seed=4)
    bogus = tmp_path / "sam2_hiera_large.pt"
    bogus.write_bytes(b"not a checkpoint")
    out = _run("build-bank", "--refs", str(refs), "--images", str(tmp_path / "images"), "--out",
               str(tmp_path / "b.npz"), "--sam", "sam2-l", "--sam-checkpoint", str(bogus),
               "--dino", "dinov2-s", "--dino-checkpoint", str(tmp_path / "missing.pth"))
    assert out.returncode == 2
    err_lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(err_lines) == 1 and str(bogus) in err_lines[0]


@pytest.mark.parametrize("argv", [["predict"], ["nope"]])
def test_cli_usage_errors(argv: list[str]) -> None:
    assert _run(*argv).returncode == 2
