"""One prepared GPU run (issue 5): correctness checks on CUDA + the benchmark table.

  python bench/gpu_check.py [--sam sam2-l --dino dinov2-l --image-size 768x1024 --tasks 1000]

Real-size architectures with random weights (timing does not depend on the weight values).
Checks: CUDA vs CPU parity of proposals on a small model; lazy top-K == reference order on CUDA;
a cache round trip gives identical detections; bf16 autocast: its effect on proposals/results.
Benchmark (fp32 and bf16): cold prediction per image, cache-hit re-score per image and their ratio,
peak GPU memory of inference, refreshing N cached tasks (cache read + re-match), bank bytes/ref.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_model import random_bank, synthetic_image  # noqa: E402
from model.engine import Engine, EngineConfig  # noqa: E402
from model.matching import match_with_stats  # noqa: E402
from model.options import MethodOptions  # noqa: E402
from model.types import Detections, Proposals  # noqa: E402


def same_detections(a: Detections, b: Detections) -> bool:
    return (a.labels == b.labels and np.array_equal(a.scores, b.scores) and np.array_equal(a.boxes, b.boxes)
            and all(np.array_equal(a.mask(i), b.mask(i)) for i in range(len(a))))


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeat: int = 5):
    fn()
    _sync()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        _sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), out


def parity_check() -> None:
    """Small models: proposals on CUDA match CPU (fp32, TF32 off for this check only)."""
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    opts = replace(MethodOptions(), sam_image_size=512, dino_image_size=224, points_per_side=8,
                   iou_threshold=-1.0)
    img = synthetic_image(300, 400, seed=1)
    torch.manual_seed(0)
    cpu = Engine(EngineConfig("sam2.1-t", "dinov2-s", random_weights=True, device="cpu", options=opts))
    gpu = Engine(EngineConfig("sam2.1-t", "dinov2-s", random_weights=True, device="cuda", options=opts))
    gpu.sam.load_state_dict(cpu.sam.state_dict())
    gpu.dino.load_state_dict(cpu.dino.state_dict())
    pc, pg = cpu.propose(img), gpu.propose(img)
    iou_diff = (pc.iou - pg.iou.cpu()).abs().max().item()
    sign_agree = ((pc.logits > 0) == (pg.logits.cpu() > 0)).float().mean().item()
    desc_cos = torch.nn.functional.cosine_similarity(pc.descriptors, pg.descriptors.cpu()).min().item()
    print(f"[parity] CPU vs CUDA small model: {len(pc)}/{len(pg)} proposals, max |dIoU| {iou_diff:.2e}, "
          f"mask sign agreement {sign_agree:.5f}, min descriptor cosine {desc_cos:.6f}")
    torch.backends.cudnn.allow_tf32 = tf32


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sam", default="sam2-l")
    ap.add_argument("--dino", default="dinov2-l")
    ap.add_argument("--image-size", default="768x1024")
    ap.add_argument("--tasks", type=int, default=1000)
    ap.add_argument("--classes", type=int, default=5)
    ap.add_argument("--shots", type=int, default=10)
    ap.add_argument("--smoke", action="store_true", help="CPU dry run with tiny models (checks the script)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    dev = "cpu" if args.smoke else "cuda"
    small = dict(sam_image_size=256, dino_image_size=112, points_per_side=4) if args.smoke else {}
    if args.smoke:
        args.sam, args.dino, args.tasks, args.image_size = "sam2.1-t", "dinov2-s", 20, "120x160"
    else:
        assert torch.cuda.is_available(), "no CUDA device"
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
        parity_check()
    h, w = (int(v) for v in args.image_size.split("x"))
    images = [synthetic_image(h, w, seed=s) for s in range(8)]
    base = Engine(EngineConfig(args.sam, args.dino, random_weights=True, device=dev,
                               options=replace(MethodOptions(), **small)))
    bank = random_bank(base.dino.embed_dim, args.classes, args.shots)
    print(f"bank: {len(bank)} refs, {len(bank.to_bytes()) / len(bank):.0f} bytes per reference "
          f"(reference code: {37 * 37 * base.dino.embed_dim * 4 / 1e6:.1f} MB per reference)")
    rows = []
    results = {}
    o = base.options
    for label, opts in [("fp32", o), ("bf16", replace(o, bf16=True)), ("fp32 keep-all", replace(o, iou_threshold=-1.0))]:
        eng = base.with_options(**opts.to_dict())
        if dev == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        cold, _ = timed(lambda: [eng.predict(im, bank) for im in images[:4]], repeat=2)
        cold /= 4
        peak = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else float("nan")
        props = [eng.propose(im) for im in images]
        blobs = [p.to_bytes() for p in props]
        hit, _ = timed(lambda: [eng.match(Proposals.from_bytes(b, dev), bank) for b in blobs[:4]], repeat=3)
        hit /= 4
        dets = [eng.match(p, bank) for p in props]
        results[label] = (props, dets)
        # exactness on CUDA: lazy == reference order, cache round trip == cold
        naive = [match_with_stats(p, bank, replace(eng.options, lazy_topk=False))[0] for p in props[:3]]
        lazy_ok = all(same_detections(a, b) for a, b in zip(dets[:3], naive))
        cache_ok = all(same_detections(d, eng.match(Proposals.from_bytes(b, dev), bank)) for d, b in zip(dets, blobs))
        # refresh N cached tasks: N cache files (copies of the 8 entries), read + re-match each
        with tempfile.TemporaryDirectory() as tmp:
            paths = []
            for i in range(args.tasks if 'keep-all' not in label else 100):
                pth = Path(tmp) / f"{i}.npz"
                pth.write_bytes(blobs[i % len(blobs)])
                paths.append(pth)
            bank2 = random_bank(base.dino.embed_dim, args.classes, args.shots, seed=1)
            _sync()
            t0 = time.perf_counter()
            n_det = sum(len(eng.match(Proposals.from_bytes(pth.read_bytes(), dev), bank2)) for pth in paths)
            _sync()
            refresh = time.perf_counter() - t0
        n_props = int(np.mean([len(p) for p in props]))
        entry_kb = np.mean([len(b) for b in blobs]) / 1024
        rows.append((label, n_props, cold, hit, cold / hit, peak, refresh, entry_kb, lazy_ok, cache_ok))
        print(f"[{label}] done: {n_props} proposals/img, {n_det} detections in refresh", flush=True)
    print(f"\n{args.sam} + {args.dino} @ {o.sam_image_size}/{o.dino_image_size}, grid {o.points_per_side}^2, image {h}x{w}, random weights, "
          f"{args.classes} classes x {args.shots} shots")
    print(f"{'mode':14s} {'props':>6s} {'cold s/img':>10s} {'hit s/img':>10s} {'ratio':>7s} {'peak GiB':>9s} "
          f"{'refresh N s':>14s} {'entry KiB':>9s} {'lazy==ref':>9s} {'cache==cold':>11s}")
    for r in rows:
        print(f"{r[0]:14s} {r[1]:6d} {r[2]:10.3f} {r[3]:10.4f} {r[4]:7.1f} {r[5]:9.2f} {r[6]:14.2f} "
              f"{r[7]:9.0f} {str(r[8]):>9s} {str(r[9]):>11s}")
    # bf16 effect on results (same images, same bank)
    (p32, d32), (p16, d16) = results["fp32"], results["bf16"]
    agree = [len(a) == len(b) for a, b in zip(p32, p16)]
    ious = []
    for a, b in zip(d32, d16):
        for i in range(min(len(a), len(b))):
            ma, mb = a.mask(i), b.mask(i)
            u = np.logical_or(ma, mb).sum()
            ious.append(np.logical_and(ma, mb).sum() / u if u else 1.0)
    print(f"\nbf16 vs fp32: same proposal count on {sum(agree)}/{len(agree)} images; detections "
          f"{sum(len(d) for d in d32)} vs {sum(len(d) for d in d16)}; mean mask IoU of rank-matched "
          f"detections {np.mean(ious) if ious else float('nan'):.3f}")


if __name__ == "__main__":
    main()
