"""Where the SAM2 mask decoder's time goes (the cold path's largest stage: 0.37 s of 0.48 s on an
H100 for 1,024 prompts), and what torch.compile would change. Timing only: random weights.

  python bench/profile_decoder.py --sam sam2-l --device cuda                 # profile, top ops
  python bench/profile_decoder.py --sam sam2-l --device cuda --compile       # + compiled decoder

Prints the decoder time for all prompts at several point batch sizes, a torch.profiler table of the
top operators (self device time) for one batch size, and with --compile the compiled decoder's time
and how far its outputs are from eager (max |logit difference|, mask sign agreement, max |IoU
difference|): a compiled decoder is not bit-identical, so it could only be an opt-in option.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_model import _sync, synthetic_image  # noqa: E402
from model.preprocess import to_sam_input  # noqa: E402
from model.proposals import decode_points, encode_image, point_grid  # noqa: E402
from model.sam import build_sam  # noqa: E402


def timed(fn, device: torch.device, repeat: int) -> tuple[float, object]:
    out = fn()  # warm-up
    _sync(device)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sam", default="sam2-l")
    ap.add_argument("--image-size", type=int, default=1024, help="SAM2 input size S")
    ap.add_argument("--points-per-side", type=int, default=32)
    ap.add_argument("--batches", default="32,64,128", help="point batch sizes to time")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile(mask decoder)")
    args = ap.parse_args()
    device = torch.device(args.device)
    sam = build_sam(args.sam, random_weights=True, device=device, image_size=args.image_size)
    x = to_sam_input(synthetic_image(768, 1024), args.image_size).to(device)
    state = encode_image(sam, x, orig_hw=(768, 1024))
    points = point_grid(args.points_per_side, args.image_size)
    batches = [int(b) for b in args.batches.split(",")]
    print(f"SAM2 {args.sam} @ {args.image_size}, {len(points)} prompts, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    for b in batches:
        t, _ = timed(lambda: decode_points(sam, state, points, b), device, args.repeat)
        print(f"decoder, point batch {b:4d}: {t:.4f} s for {len(points)} prompts ({1e3 * t / len(points):.3f} ms/prompt)")

    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        decode_points(sam, state, points, batches[0])
        _sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=args.top))

    if args.compile:  # the product's path: NTT_COMPILE_DECODER (model.proposals.mask_decoder)
        t0 = time.perf_counter()
        t, (logits_c, iou_c) = timed(lambda: decode_points(sam, state, points, batches[0], compiled=True),
                                     device, args.repeat)
        print(f"compiled decoder, point batch {batches[0]}: {t:.4f} s (compile + warm-up {time.perf_counter() - t0:.1f} s)")
        logits_e, iou_e = decode_points(sam, state, points, batches[0])
        print(f"compiled vs eager: max |logit diff| {(logits_c - logits_e).abs().max().item():.3g}, "
              f"mask sign agreement {((logits_c > 0) == (logits_e > 0)).float().mean().item():.6f}, "
              f"max |IoU diff| {(iou_c - iou_e).abs().max().item():.3g}")

if __name__ == "__main__":
    main()
