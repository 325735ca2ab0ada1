"""Click -> mask latency of `Engine.segment` (issue 14), warm and cold SAM2 image embedding.

  HF_HUB_OFFLINE=1 .venv/bin/python bench/click_latency.py                 # SAM2 hiera_t @ 1024, CPU
  HF_HUB_OFFLINE=1 .venv/bin/python bench/click_latency.py --sam sam2-l --device cuda

Cold: a click on an image whose embedding is not in memory (the image encoder runs, then the
prompt encoder + decoder). Warm: further clicks on an image already embedded (a task opened and
warmed, or pre-annotated), given by key: prompt encoder + decoder + upsampling to the image size.
Prompts alternate between a single positive click (3 masks, best by predicted IoU), a positive and
a negative click, and a box. Random weights (the work does not depend on the values).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_model import synthetic_image  # noqa: E402
from model.engine import Engine, EngineConfig  # noqa: E402
from model.options import MethodOptions  # noqa: E402


def _prompts(h: int, w: int, i: int) -> dict:
    x, y = (0.2 + 0.6 * ((i * 37) % 100) / 100) * w, (0.2 + 0.6 * ((i * 61) % 100) / 100) * h
    return [dict(points=[(x, y, True)]),
            dict(points=[(x, y, True), (w - x, h - y, False)]),
            dict(box=(x * 0.5, y * 0.5, min(w - 1, x * 1.5), min(h - 1, y * 1.5)))][i % 3]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def percentiles(ms: list[float]) -> str:
    p50, p95 = np.percentile(ms, [50, 95])
    return f"p50 {p50:8.1f} ms   p95 {p95:8.1f} ms   (n = {len(ms)}, min {min(ms):.1f}, max {max(ms):.1f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sam", default="sam2-t")
    ap.add_argument("--dino", default="dinov2-s")
    ap.add_argument("--sam-image-size", type=int, default=1024)
    ap.add_argument("--image-size", default="360x640", help="HxW of the synthetic images")
    ap.add_argument("--device", default=None)
    ap.add_argument("--warm", type=int, default=60, help="clicks on warm embeddings")
    ap.add_argument("--cold", type=int, default=12, help="clicks on new images")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    h, w = (int(v) for v in args.image_size.split("x"))
    opts = replace(MethodOptions(), sam_image_size=args.sam_image_size, compile_decoder=False)
    engine = Engine(EngineConfig(args.sam, args.dino, random_weights=True, device=args.device, options=opts))
    images = [synthetic_image(h, w, seed=s) for s in range(args.cold + 1)]
    engine.segment(images[-1], **_prompts(h, w, 0))  # first-call overheads out of the figures
    cold, warm = [], []
    for i, image in enumerate(images[:-1]):
        _sync(engine.device)
        t0 = time.perf_counter()
        seg = engine.segment(image, **_prompts(h, w, i), key=f"cold-{i}")
        _sync(engine.device)
        cold.append(1e3 * (time.perf_counter() - t0))
        assert seg.mask.shape == (h, w)
    for i in range(args.warm):
        _sync(engine.device)
        t0 = time.perf_counter()
        engine.segment(f"cold-{args.cold - 1 - i % min(args.cold, 8)}", **_prompts(h, w, i))  # cached
        _sync(engine.device)
        warm.append(1e3 * (time.perf_counter() - t0))
    print(f"{args.sam} @ {args.sam_image_size}, device {engine.device}, {torch.get_num_threads()} threads, "
          f"image {h}x{w}, load avg {os.getloadavg()[0]:.2f}")
    print(f"cold embedding (encoder + decoder): {percentiles(cold)}")
    print(f"warm embedding (decoder only):      {percentiles(warm)}")
    print(f"embedding cache: {len(engine.embeddings)} images, {engine.embeddings.nbytes / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
