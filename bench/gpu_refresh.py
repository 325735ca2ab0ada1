"""Refresh timing on a GPU with realistic cached proposals (the second prepared device run).

Random-weight SAM2 masks are dithered noise, so their cache entries are pathological (176 MB per
image instead of ~1 MB). This script times the refresh path (cache read + re-match) on N cached
tasks whose proposals are smooth blob masks of realistic count and size (hand-made, as the tests).
  python bench/gpu_refresh.py --tasks 1000 --proposals 300 --device cuda
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_model import random_bank  # noqa: E402
from model.matching import match  # noqa: E402
from model.options import MethodOptions  # noqa: E402
from model.types import Proposals  # noqa: E402


def blob_proposals(n: int, dim: int, image_size: tuple[int, int], low: int = 256, seed: int = 0) -> Proposals:
    """n elliptic blobs with smooth logits (distance to the border), unit random descriptors."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:low, 0:low].astype(np.float32)
    logits = np.empty((n, low, low), np.float32)
    for i in range(n):
        cy, cx = rng.uniform(0, low, 2)
        ry, rx = rng.uniform(4, low / 4, 2)
        d = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
        logits[i] = (1.0 - d) * 8.0
    desc = torch.nn.functional.normalize(torch.from_numpy(rng.standard_normal((n, dim)).astype(np.float32)), dim=1)
    return Proposals(torch.from_numpy(logits), torch.from_numpy(rng.uniform(0.4, 1, n).astype(np.float32)), desc,
                     image_size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=1000)
    ap.add_argument("--proposals", type=int, default=300)
    ap.add_argument("--distinct", type=int, default=8)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--image-size", default="768x1024")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="/tmp/ntt_refresh_cache")
    args = ap.parse_args()
    h, w = (int(v) for v in args.image_size.split("x"))
    blobs = [blob_proposals(args.proposals, args.dim, (h, w), seed=s).to_bytes() for s in range(args.distinct)]
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(args.tasks):
        p = folder / f"{i}.npz"
        p.write_bytes(blobs[i % len(blobs)])
        paths.append(p)
    bank = random_bank(args.dim, 5, 10, seed=1)
    opts = MethodOptions()
    for p in paths[:3]:  # warm-up
        match(Proposals.from_bytes(p.read_bytes(), args.device), bank, opts)
    t_read = t_match = 0.0
    n_det = 0
    for p in paths:
        t0 = time.perf_counter()
        props = Proposals.from_bytes(p.read_bytes(), args.device)
        t1 = time.perf_counter()
        n_det += len(match(props, bank, opts, score_threshold=0.0))
        if args.device == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        t_read += t1 - t0
        t_match += t2 - t1
    print(f"refresh {args.tasks} cached tasks on {args.device}: {args.proposals} blob proposals each, "
          f"image {h}x{w}, entry {np.mean([len(b) for b in blobs]) / 1024:.0f} KiB; "
          f"cache read {t_read:.2f} s + re-match {t_match:.2f} s = {t_read + t_match:.2f} s "
          f"({(t_read + t_match) / args.tasks * 1000:.1f} ms/task, {n_det} detections)")


if __name__ == "__main__":
    main()
