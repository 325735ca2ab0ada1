"""Per-stage time and peak memory of the method on one image (issue 2), CPU or CUDA.

  python bench/bench_model.py --sam sam2.1-t --dino dinov2-s --sam-image-size 256 --dino-image-size 224 \
      --points-per-side 8 --image-size 480x640 --random-weights
  python bench/bench_model.py --sam sam2-l --dino dinov2-l --random-weights --device cuda   # paper sizes

Random weights give the same timings as real ones for the encoders and the decoder (the work does not
depend on the values); the number of proposals that survive the IoU filter does, so `--keep-all`
forces every prompt through (iou threshold -1) to time the worst case of the later stages.
Prints one table: stage, seconds (median of --repeat runs after one warm-up), peak memory.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.bank import MemoryBank  # noqa: E402
from model.dino import dino_patch_tokens  # noqa: E402
from model.engine import Engine, EngineConfig  # noqa: E402
from model.matching import match_with_stats  # noqa: E402
from model.options import MethodOptions  # noqa: E402
from model.preprocess import to_dino_input, to_sam_input  # noqa: E402
from model.proposals import build_proposals, decode_points, encode_image, point_grid  # noqa: E402
from model.types import Proposals  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (KiB -> MiB)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def synthetic_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A photo-like test image: smooth background with a few coloured blobs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(xx * 255 / w), (yy * 255 / h), np.full((h, w), 128.0)], -1)
    for _ in range(12):
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(min(h, w) // 20, min(h, w) // 6)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(0, 255, 3)
    return img.astype(np.uint8)


def random_bank(dim: int, classes: int, shots: int, seed: int = 0) -> MemoryBank:
    rng = np.random.default_rng(seed)
    bank = MemoryBank()
    for c in range(classes):
        for k in range(shots):
            bank.add(f"class{c}", f"ref{c}-{k}", rng.standard_normal(dim).astype(np.float32))
    return bank


class Timer:
    def __init__(self, device: torch.device, repeat: int) -> None:
        self.device, self.repeat, self.rows = device, repeat, []

    def run(self, name: str, fn, warmup: bool = True):
        if warmup:
            out = fn()
        times = []
        _reset_peak(self.device)
        for _ in range(self.repeat):
            _sync(self.device)
            t0 = time.perf_counter()
            out = fn()
            _sync(self.device)
            times.append(time.perf_counter() - t0)
        self.rows.append((name, statistics.median(times), _peak_mb(self.device)))
        return out

    def print(self, header: str) -> None:
        print(header)
        print(f"{'stage':38s} {'seconds':>10s} {'peak MiB':>10s}")
        for name, sec, mb in self.rows:
            print(f"{name:38s} {sec:10.4f} {mb:10.0f}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sam", default="sam2.1-t")
    ap.add_argument("--dino", default="dinov2-s")
    ap.add_argument("--sam-checkpoint")
    ap.add_argument("--dino-checkpoint")
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--device", default=None)
    ap.add_argument("--sam-image-size", type=int, default=1024)
    ap.add_argument("--dino-image-size", type=int, default=518)
    ap.add_argument("--points-per-side", type=int, default=32)
    ap.add_argument("--point-batch", type=int, default=64)
    ap.add_argument("--image-size", default="768x1024", help="HxW of the synthetic target image")
    ap.add_argument("--classes", type=int, default=5)
    ap.add_argument("--shots", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keep-all", action="store_true", help="iou threshold -1: every prompt is a proposal")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--compile-decoder", action="store_true", help="torch.compile the SAM2 mask decoder")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    ap.add_argument("--no-cache-stages", action="store_true",
                    help="skip cache write/read timings (random-weight masks are noise: huge entries)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    h, w = (int(v) for v in args.image_size.split("x"))
    opts = replace(MethodOptions(), sam_image_size=args.sam_image_size, dino_image_size=args.dino_image_size,
                   points_per_side=args.points_per_side, point_batch_size=args.point_batch, bf16=args.bf16,
                   compile_decoder=args.compile_decoder,
                   iou_threshold=-1.0 if args.keep_all else MethodOptions.iou_threshold)
    t0 = time.perf_counter()
    engine = Engine(EngineConfig(args.sam, args.dino, args.sam_checkpoint, args.dino_checkpoint,
                                 args.random_weights, args.device, opts))
    load_s = time.perf_counter() - t0
    device = engine.device
    image = synthetic_image(h, w)
    bank = random_bank(engine.dino.embed_dim, args.classes, args.shots)
    timer = Timer(device, args.repeat)
    with torch.inference_mode():
        x = timer.run("preprocess (PIL resize to SAM size)", lambda: to_sam_input(image, opts.sam_image_size).to(device))
        tokens = timer.run("DINOv2 target features", lambda: dino_patch_tokens(
            engine.dino, to_dino_input(x, opts.dino_image_size)))
        state = timer.run("SAM2 image encoder", lambda: encode_image(engine.sam, x, orig_hw=(h, w), bf16=opts.bf16))
        pts = point_grid(opts.points_per_side, opts.sam_image_size, opts.grid)
        logits, iou = timer.run(f"SAM2 decoder ({len(pts)} prompts)",
                                lambda: decode_points(engine.sam, state, pts, opts.point_batch_size,
                                                             opts.compile_decoder))
        props = timer.run("IoU filter + descriptor pooling", lambda: build_proposals(
            logits, iou, tokens[0].float(), (h, w), opts))
        if args.no_cache_stages:
            blob, cached = None, props
        else:
            blob = timer.run("proposals -> bytes (cache write)", props.to_bytes)
            cached = timer.run("bytes -> proposals (cache read)", lambda: Proposals.from_bytes(blob, device))
        lazy = replace(opts, lazy_topk=True)
        naive = replace(opts, lazy_topk=False)
        det, st_l = timer.run("match, lazy top-K (ours)", lambda: match_with_stats(cached, bank, lazy))
        det2, st_n = timer.run("match, reference order (all masks)", lambda: match_with_stats(cached, bank, naive))
        timer.run("cold total (engine.predict)", lambda: engine.predict(image, bank))
        if blob is not None:
            timer.run("cache-hit re-score (read + match)", lambda: engine.match(Proposals.from_bytes(blob, device), bank))
    same = (det.labels == det2.labels and np.array_equal(det.scores, det2.scores))
    timer.print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), "
                f"{args.sam} @ {opts.sam_image_size} + {args.dino} @ {opts.dino_image_size}, "
                f"grid {opts.points_per_side}x{opts.points_per_side}, image {h}x{w}, bf16={opts.bf16}, "
                f"compiled decoder={opts.compile_decoder}, "
                f"models loaded in {load_s:.1f} s")
    print(f"proposals: {len(props)}; cache entry {len(blob or b'') / 1024:.0f} KiB; detections {len(det)}; "
          f"full-res masks computed lazy/reference: {st_l.upsampled}/{st_n.upsampled}; identical: {same}")
    print(f"bank: {len(bank)} refs, {len(bank.to_bytes()) / len(bank):.0f} bytes per reference")


if __name__ == "__main__":
    main()
