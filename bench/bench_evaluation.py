"""Cost of the leave-one-task-out evaluation (issue 13) of a project with cached proposals, against
one cold prediction per task.

  HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_evaluation.py                 # 200 tasks, 1 and 4 variants

Random-weight models (timings do not depend on the weights; what is detected does, so AP figures
are noise and not printed). Tasks are synthetic scenes of coloured discs, 3 annotated per task in
2 classes; `--images` distinct images are proposed once (cold) and shared by the tasks, as cached
proposals (Proposals.to_bytes, decoded on every match like a cache read) with their upsampled masks
warmed by one match, as the backend's predictions leave them. Each task's references are its own
bank group. Variants beyond the faithful one are stand-ins (other MethodOptions values) with the
cost of a match: the evaluation's cost is one match per task and variant plus the learning curve.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.quality.evaluation import AnnotatedTask, EvaluationSettings, TruthRegion, evaluate_project  # noqa: E402
from bench_refresh import machine  # noqa: E402
from cli_args import add_model_args  # noqa: E402
from model.bank import MemoryBank  # noqa: E402
from model.engine import Engine, EngineConfig  # noqa: E402
from model.options import MethodOptions  # noqa: E402
from model.types import Proposals  # noqa: E402
from model.upsampled import UpsampledMasks  # noqa: E402

STAND_INS = {"merge-1.0": {"merge_exponent": 1.0}, "nms-0.7": {"nms_threshold": 0.7},
             "premerge-4": {"pre_merge_factor": 4}}


def scene(h: int, w: int, seed: int, regions: int) -> tuple[np.ndarray, list[tuple[str, np.ndarray]]]:
    """A smooth background with `regions` discs of two classes ('red' and 'blue' discs)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.stack([xx * 255 / w, yy * 255 / h, np.full((h, w), 128.0)], -1)
    truth = []
    for k in range(regions):
        cy, cx, r = rng.integers(h // 8, h - h // 8), rng.integers(w // 8, w - w // 8), rng.integers(h // 12, h // 5)
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        label = "red" if k % 2 == 0 else "blue"
        image[mask] = (220, 40, 40) if label == "red" else (40, 40, 220)
        truth.append((label, mask))
    return image.astype(np.uint8), truth


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap, sam="sam2.1-t", sam_image_size=256, dino_image_size=224, points_per_side=4,
                   image_size="240x320")
    ap.add_argument("--device", default=None, help="cpu, cuda (default: CUDA when present)")
    ap.add_argument("--tasks", type=int, default=200, help="annotated tasks")
    ap.add_argument("--images", type=int, default=8, help="distinct images (proposed cold once, shared by tasks)")
    ap.add_argument("--regions", type=int, default=3, help="annotated regions per task")
    ap.add_argument("--variants", default="1,4", help="comma-separated variant counts to time")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 per match thread)")
    ap.add_argument("--match-threads", type=int, default=1, help="matches run at once (a thread pool's map)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    h, w = (int(v) for v in args.image_size.split("x"))
    opts = replace(MethodOptions(), sam_image_size=args.sam_image_size, dino_image_size=args.dino_image_size,
                   points_per_side=args.points_per_side)
    engine = Engine(EngineConfig(args.sam, args.dino, random_weights=True, device=args.device, options=opts))

    scenes = [scene(h, w, seed, args.regions) for seed in range(args.images)]
    descriptors = [engine.encode_references(image, masks=[m for _, m in truth]) for image, truth in scenes]
    rng = np.random.default_rng(0)
    bank, tasks = MemoryBank(), []
    for t in range(args.tasks):
        m = t % args.images
        _, truth = scenes[m]
        for j, ((label, _), desc) in enumerate(zip(truth, descriptors[m])):
            if desc is not None:   # a little noise: every task's references differ
                noisy = desc + 0.05 * rng.standard_normal(desc.shape).astype(np.float32)
                bank.add(label, f"t{t}:{j}", noisy, f"ann{t}")
        tasks.append(AnnotatedTask(t, (h, w), tuple(TruthRegion(label, mask=mask) for label, mask in truth),
                                   frozenset({f"ann{t}"})))

    engine.predict(scenes[0][0], bank)                                    # warm-up
    cold, cached, masks = [], [], []
    for image, _ in scenes:
        start = time.perf_counter()
        proposals = engine.propose(image)
        result = engine.match_full(proposals, bank, score_threshold=0.0)
        cold.append(time.perf_counter() - start)
        cached.append(proposals.to_bytes())
        cache = UpsampledMasks(proposals.checksum())
        cache.update(result.upsampled)
        masks.append(cache)
    cold_s = statistics.median(cold)

    match_seconds = [0.0]

    def match(task_id: int, task_bank: MemoryBank, options: dict | None):
        start = time.perf_counter()
        proposals = Proposals.from_bytes(cached[task_id % args.images])
        eng = engine if options is None else engine.with_options(**options)
        det = eng.match(proposals, task_bank, score_threshold=0.0, masks=masks[task_id % args.images])
        match_seconds[0] += time.perf_counter() - start
        return det

    print(f"machine: {machine()}")
    print(f"models: {args.sam} @ {args.sam_image_size} + {args.dino} @ {args.dino_image_size}, "
          f"grid {args.points_per_side}x{args.points_per_side}, image {h}x{w}, random weights")
    print(f"project: {args.tasks} annotated tasks ({args.images} distinct images), {args.regions} regions "
          f"per task in 2 classes, bank of {len(bank)} references")
    print(f"cold prediction per task (propose + match, median of {len(cold)}): {cold_s:.3f} s")
    with ThreadPoolExecutor(args.match_threads) as pool:
        for n in (int(v) for v in args.variants.split(",")):
            variants = {"ntt": None, **dict(list(STAND_INS.items())[:n - 1])}
            match_seconds[0] = 0.0
            start = time.perf_counter()
            result = evaluate_project(tasks, bank, match, variants, EvaluationSettings(),
                                      map_fn=pool.map if args.match_threads > 1 else map)
            total = time.perf_counter() - start
            per_task = total / args.tasks
            loo = args.tasks * n
            print(f"evaluation, {n} variant(s): {total:.3f} s = {1000 * per_task:.1f} ms/task "
                  f"= {100 * per_task / cold_s:.1f}% of a cold prediction per task; "
                  f"{result['cost']['matches']} matches (leave-one-out {loo}, learning curve "
                  f"{result['cost']['matches'] - loo}, points {[p['tasks'] for p in result['curve']]}); "
                  + (f"in matches {match_seconds[0]:.2f} s, other (banks, COCOeval, RLE) "
                     f"{total - match_seconds[0]:.2f} s" if args.match_threads == 1 else
                     f"{args.match_threads} match threads"))


if __name__ == "__main__":
    main()
