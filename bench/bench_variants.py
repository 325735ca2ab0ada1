"""Match time of each matching variant (docs/method.md, "Variants") on the same synthetic proposals.

  python bench/bench_variants.py                        # 1000 proposals, 1024-px SAM2 (256² low-res), 768x1024
  python bench/bench_variants.py --proposals 40 --low 64 --image-size 60x80 --dim 16   # tiny (smoke test)

Proposals are smooth random blobs (parts inside wholes) with noisy class descriptors; the bank has
--classes classes of --shots references each and --negatives negatives. Prints, per variant, the
median seconds of a match without a mask cache (cold) and with the cache the first match filled
(warm: what a refresh after a bank change pays), torch on one thread, and the detections' count.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.bank import MemoryBank  # noqa: E402
from model.matching import match_full  # noqa: E402
from model.options import MERGES, NEGATIVES, MethodOptions  # noqa: E402
from model.types import Proposals  # noqa: E402
from model.upsampled import UpsampledMasks  # noqa: E402


def scene(args: argparse.Namespace) -> tuple[Proposals, MemoryBank]:
    g = torch.Generator().manual_seed(0)
    protos = F.normalize(torch.randn(args.classes, args.dim, generator=g), dim=1)
    bank = MemoryBank()
    for c in range(args.classes):
        for k in range(args.shots):
            bank.add(f"c{c}", f"{c}-{k}", (protos[c] + 0.5 * torch.randn(args.dim, generator=g)).numpy())
    for k in range(args.negatives):
        c = k % args.classes
        bank.add_negative(f"c{c}", f"n{k}", (protos[c] + 0.7 * torch.randn(args.dim, generator=g)).numpy())
    yy, xx = torch.meshgrid(torch.arange(args.low) + 0.5, torch.arange(args.low) + 0.5, indexing="ij")
    logits, descs, params = [], [], []
    for i in range(args.proposals):
        u = torch.rand(5, generator=g).tolist()
        if params and u[0] < 0.4:                   # a part of an earlier blob
            cx, cy, rx, ry = params[int(u[1] * len(params))]
            p = (cx + (u[2] - 0.5) * rx, cy + (u[3] - 0.5) * ry, rx * (0.3 + 0.5 * u[4]), ry * (0.3 + 0.5 * u[4]))
        else:
            p = (u[1] * args.low, u[2] * args.low, 2 + u[3] * args.low / 4, 2 + u[4] * args.low / 4)
        params.append(p)
        d = torch.sqrt(((xx - p[0]) / p[2]) ** 2 + ((yy - p[1]) / p[3]) ** 2)
        logits.append(((1 - d) * 2.5 * min(p[2], p[3])).clamp(-5, 5))
        c = int(torch.randint(args.classes, (1,), generator=g))
        descs.append(F.normalize(protos[c] + 0.8 * torch.randn(args.dim, generator=g), dim=0))
    iou = 0.4 + 0.6 * torch.rand(args.proposals, generator=g)
    p = Proposals(torch.stack(logits), iou, torch.stack(descs), args.image_size)
    return Proposals.from_bytes(p.to_bytes()), bank          # packed, as read from the cache


def timed(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--proposals", type=int, default=1000)
    ap.add_argument("--low", type=int, default=256, help="low-res mask side (SAM2 input / 4)")
    ap.add_argument("--image-size", default="768x1024", help="HxW")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--negatives", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    args.image_size = tuple(int(v) for v in args.image_size.split("x"))
    torch.set_num_threads(1)
    p, bank = scene(args)
    print(f"{args.proposals} proposals, low-res {args.low}², image {args.image_size[0]}x{args.image_size[1]}, "
          f"D {args.dim}, {args.classes} classes x {args.shots} refs, {args.negatives} negatives; torch 1 thread")
    print(f"{'merge':<18}{'negatives':<18}{'cold s':>8}{'warm s':>8}{'dets':>6}{'suppressed':>12}")
    for merge in MERGES:
        for negatives in NEGATIVES:
            opts = replace(MethodOptions(), merge=merge, negatives=negatives)
            cold, first = timed(lambda: match_full(p, bank, opts), args.repeat)
            cache = UpsampledMasks(p.checksum())
            cache.update(first.upsampled)
            warm, result = timed(lambda: match_full(p, bank, opts, masks=cache), args.repeat)
            print(f"{merge:<18}{negatives:<18}{cold:>8.3f}{warm:>8.3f}{len(result.detections):>6}"
                  f"{result.stats.suppressed:>12}")


if __name__ == "__main__":
    main()
