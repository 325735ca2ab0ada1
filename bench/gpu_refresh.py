"""Refresh timing on a GPU with realistic cached proposals (the second prepared device run).

Random-weight SAM2 masks are dithered noise, so their cache entries are pathological (176 MB per
image instead of ~1 MB). This script times the refresh path (cache read + re-match) on N cached
tasks whose proposals are smooth blob masks of realistic count and size (hand-made, as the tests),
through the product's proposal cache: a first refresh (no upsampled masks stored yet), then the next
one after a reference is added (the masks the first one upsampled are read back).
  python bench/gpu_refresh.py --tasks 1000 --proposals 300 --device cuda --threads 1,8
"""
from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from backend.storage.proposal_cache import ProposalCache  # noqa: E402
from bench_model import random_bank  # noqa: E402
from model.bank import MemoryBank  # noqa: E402
from model.engine import match_pool  # noqa: E402
from model.matching import match, match_full  # noqa: E402
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
    ap.add_argument("--distinct", type=int, default=8, help="distinct proposal sets (each task has its own entry)")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--image-size", default="768x1024")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="/tmp/ntt_refresh_cache")
    ap.add_argument("--threads", default="1", help="comma-separated re-score thread counts, timed in turn "
                    "(REFRESH_THREADS), e.g. 1,2,8")
    args = ap.parse_args()
    h, w = (int(v) for v in args.image_size.split("x"))
    blobs = [blob_proposals(args.proposals, args.dim, (h, w), seed=s) for s in range(args.distinct)]
    folder = Path(args.out)
    shutil.rmtree(folder, ignore_errors=True)
    cache = ProposalCache(folder, max_bytes=1 << 40)
    keys = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(args.tasks)]
    for i, key in enumerate(keys):  # one entry per task, as for distinct images
        cache.put(key, blobs[i % len(blobs)])
    entry_kib = cache.total_bytes() / len(keys) / 1024
    bank = random_bank(args.dim, 5, 10, seed=1)
    grown = MemoryBank.from_bytes(bank.to_bytes())   # the next bank: one more reference of class0
    grown.add("class0", "ref0-new", np.random.default_rng(2).standard_normal(args.dim).astype(np.float32))
    opts = MethodOptions()
    for p in blobs[:3]:  # warm-up
        match(p.to(args.device), bank, opts)
    timings = {}
    for threads in [int(t) for t in args.threads.split(",")]:
        for side in folder.glob("*/*.ntm"):  # every thread count starts without stored masks
            side.unlink()
        for name, b in (("first refresh", bank), ("next refresh (one more reference)", grown)):
            t_read, t_match, n_det, wall, stored = run(cache, keys, b, opts, args.device, threads)
            timings[threads, name] = wall
            print(f"{name}: {args.tasks} cached tasks on {args.device}, {threads} thread(s), {args.proposals} blob "
                  f"proposals each, image {h}x{w}, entry {entry_kib:.0f} KiB; cache read {t_read:.2f} s + re-match "
                  f"{t_match:.2f} s{' (summed over threads)' if threads > 1 else ''}; wall {wall:.2f} s "
                  f"({wall / args.tasks * 1000:.1f} ms/task, {n_det} detections; upsampled masks stored: "
                  f"{stored / 2**20:.0f} MiB)", flush=True)
    firsts = {t: v for (t, name), v in timings.items() if name == "first refresh"}
    if len(firsts) > 1 and 1 in firsts:
        print("first refresh, speed-up vs 1 thread: "
              + ", ".join(f"{t} threads x{firsts[1] / v:.2f}" for t, v in firsts.items() if t != 1))


def run(cache: ProposalCache, keys: list[str], bank: MemoryBank, opts: MethodOptions, device: str,
        threads: int) -> tuple[float, float, int, float, int]:
    """(cache read s, re-match s, detections, wall s, stored mask bytes) of re-scoring every task on
    `threads` threads, as backend.jobs.refresh.rescore_cached does (REFRESH_THREADS): cache.get + get_masks,
    match on the worker's device, put_masks."""
    lock = threading.Lock()
    totals = [0.0, 0.0, 0]

    def one(key: str) -> None:
        t0 = time.perf_counter()
        props = cache.get(key)
        masks = cache.get_masks(key, props)
        t1 = time.perf_counter()
        result = match_full(props.to(device), bank, opts, score_threshold=0.0, masks=masks)
        n = len(result.detections)
        if len(result.upsampled):
            masks.update(result.upsampled)
            cache.put_masks(key, masks)
        if device == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        with lock:
            totals[0] += t1 - t0
            totals[1] += t2 - t1
            totals[2] += n

    t0 = time.perf_counter()
    with match_pool(threads) as pool:  # as rescore_cached: torch single-threaded in each
        list(pool.map(one, keys))
    wall = time.perf_counter() - t0
    stored = sum(p.stat().st_size for p in cache.dir.glob("*/*.ntm"))
    return totals[0], totals[1], totals[2], wall, stored

if __name__ == "__main__":
    main()
