"""The cold path (a new image -> proposals -> detections) per stage, with peak RSS, for one or more
versions of this repository side by side (issue 14). Each run is its own process, so its peak RSS
(ru_maxrss) is its own; versions alternate within each repeat, so they share the machine's load.

  # old (a checkout of main) vs new (this tree), 2 repeats, SAM2 hiera_t + DINOv2 ViT-S, 32x32 grid:
  git worktree add --detach /tmp/ntt-main main
  HF_HUB_OFFLINE=1 .venv/bin/python bench/cold_path.py --code old=/tmp/ntt-main:eager --code new=.:default \\
      --repeat 2

`--code NAME=ROOT:MODE`: the repository at ROOT, MODE `eager` (compile_decoder off), `compiled` (on)
or `default` (that version's MethodOptions default). Random weights (fixed seed: every process
builds the same models), fp32, CPU. The first version is the baseline of the output check: max
|low-res logit difference| over all prompts, the proposals past the IoU filter, the detections.
The compile (at worker start, `Engine.prepare`) is timed apart from the per-image total; all runs
share one fresh TORCHINDUCTOR_CACHE_DIR, so later runs show the compile with a warm inductor cache.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

STAGES = ["preprocess", "dinov2", "sam2 encoder", "sam2 decoder", "filter + descriptors", "match"]


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args: argparse.Namespace) -> None:
    """One cold path in this process, with the code of args.root; prints one JSON line."""
    sys.path.insert(0, str(Path(args.root).resolve()))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch
    from dataclasses import replace

    from bench_model import synthetic_image
    from model.bank import MemoryBank
    from model.dino import dino_patch_tokens
    from model.engine import Engine, EngineConfig
    from model.matching import match_full
    from model.options import MethodOptions
    from model.preprocess import to_dino_input, to_sam_input
    from model.proposals import build_proposals, decode_points, encode_image, point_grid

    if args.threads:
        torch.set_num_threads(args.threads)
    opts = replace(MethodOptions(), points_per_side=args.points_per_side, sam_image_size=args.sam_image_size,
                   dino_image_size=args.dino_image_size)
    if args.mode != "default":
        opts = replace(opts, compile_decoder=args.mode == "compiled")
    h, w = (int(v) for v in args.image_size.split("x"))
    out: dict = {"stages": {}, "rss": {}, "compile_decoder": opts.compile_decoder}
    t0 = time.perf_counter()
    engine = Engine(EngineConfig(args.sam, args.dino, random_weights=True, device="cpu", options=opts))
    out["load_s"], out["rss"]["load"] = time.perf_counter() - t0, _rss_mib()
    t0 = time.perf_counter()
    if opts.compile_decoder:  # at worker start (Engine.prepare); older versions compiled on first use
        if hasattr(engine, "prepare"):
            engine.prepare()
        else:
            with torch.inference_mode():
                st = encode_image(engine.sam, torch.zeros(1, 3, opts.sam_image_size, opts.sam_image_size))
                decode_points(engine.sam, st, point_grid(opts.points_per_side, opts.sam_image_size)[:opts.point_batch_size],
                              opts.point_batch_size, compiled=True)
    out["compile_s"], out["rss"]["compile"] = time.perf_counter() - t0, _rss_mib()
    image = synthetic_image(h, w)

    def stage(name, fn):
        t = time.perf_counter()
        result = fn()
        out["stages"][name], out["rss"][name] = time.perf_counter() - t, _rss_mib()
        return result

    with torch.inference_mode():
        x = stage("preprocess", lambda: to_sam_input(image, opts.sam_image_size))
        tokens = stage("dinov2", lambda: dino_patch_tokens(engine.dino, to_dino_input(x, opts.dino_image_size)))
        state = stage("sam2 encoder", lambda: encode_image(engine.sam, x, orig_hw=(h, w)))
        pts = point_grid(opts.points_per_side, opts.sam_image_size, opts.grid)
        logits, iou = stage("sam2 decoder", lambda: decode_points(engine.sam, state, pts, opts.point_batch_size,
                                                                  opts.compile_decoder))
        props = stage("filter + descriptors", lambda: build_proposals(logits, iou, tokens[0].float(), (h, w), opts))
        bank = MemoryBank()  # 5 classes, 4 references each: proposals' own descriptors, so many detections
        for k, d in enumerate(props.descriptors[::max(1, len(props) // 20)][:20]):
            bank.add(f"class{k % 5}", f"ref{k}", d.numpy())
        det = stage("match", lambda: match_full(props, bank, opts).detections)
    out["total_s"] = sum(out["stages"].values())
    out["peak_rss_mib"] = _rss_mib()
    out["proposals"], out["detections"] = len(props), len(det)
    if args.save:
        np.savez(args.save, logits=logits.numpy(), iou=iou.numpy(), kept_iou=props.iou.numpy(),
                 descriptors=props.descriptors.numpy(), det_scores=det.scores, det_boxes=det.boxes,
                 det_labels=np.array(det.labels))
    print("RESULT " + json.dumps(out), flush=True)


def compare(base: Path, other: Path) -> str:
    """The output check of `other` against the baseline run `base`."""
    a, b = np.load(base), np.load(other)
    logit_diff = float(np.abs(a["logits"] - b["logits"]).max())
    same_props = a["kept_iou"].shape == b["kept_iou"].shape and np.array_equal(
        (a["iou"] > 0.4) & (a["logits"] > 0).any(axis=(1, 2)), (b["iou"] > 0.4) & (b["logits"] > 0).any(axis=(1, 2)))
    same_det = (np.array_equal(a["det_labels"], b["det_labels"]) and np.array_equal(a["det_boxes"], b["det_boxes"])
                and np.allclose(a["det_scores"], b["det_scores"], rtol=0, atol=1e-5))
    return (f"max |low-res logit diff| {logit_diff:.2g} (<= 1e-4: {logit_diff <= 1e-4}), "
            f"max |IoU diff| {float(np.abs(a['iou'] - b['iou']).max()):.2g}, same proposals past the filter: "
            f"{same_props} ({a['kept_iou'].shape[0]}), same detections: {same_det} ({a['det_labels'].shape[0]})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--code", action="append", default=[], help="NAME=ROOT:MODE (see above); repeatable")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--sam", default="sam2-t")
    ap.add_argument("--dino", default="dinov2-s")
    ap.add_argument("--points-per-side", type=int, default=32)
    ap.add_argument("--sam-image-size", type=int, default=1024)
    ap.add_argument("--dino-image-size", type=int, default=518)
    ap.add_argument("--image-size", default="360x640", help="HxW of the synthetic image")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, the cores)")
    ap.add_argument("--workdir", help="where the runs' outputs go (default: a temporary directory)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="default", help=argparse.SUPPRESS)
    ap.add_argument("--save", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    codes = [(c.split("=", 1)[0], *c.split("=", 1)[1].rsplit(":", 1)) for c in args.code or ["new=.:default"]]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ntt-cold-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor")}
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in codes}
    for r in range(args.repeat):
        for name, root, mode in codes:
            cmd = [sys.executable, __file__, "--child", "--root", root, "--mode", mode, "--sam", args.sam,
                   "--dino", args.dino, "--points-per-side", str(args.points_per_side), "--sam-image-size",
                   str(args.sam_image_size), "--dino-image-size", str(args.dino_image_size), "--image-size",
                   args.image_size, "--threads", str(args.threads)]
            if r == 0:
                cmd += ["--save", str(work / f"{name}.npz")]
            load = os.getloadavg()[0]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                sys.exit(f"{name} run {r} failed:\n{proc.stderr[-3000:]}")
            res = json.loads(line[len("RESULT "):])
            res["load_avg_before"] = load
            runs[name].append(res)
            print(f"run {r} {name}: total {res['total_s']:.1f} s, decoder {res['stages']['sam2 decoder']:.1f} s, "
                  f"compile {res['compile_s']:.1f} s, peak RSS {res['peak_rss_mib']:.0f} MiB, "
                  f"load avg before {load:.2f}", flush=True)
    print(f"\n{args.sam} + {args.dino}, {args.points_per_side}x{args.points_per_side} grid, image "
          f"{args.image_size}, fp32, CPU, {os.cpu_count()} cores; median (min-max) of {args.repeat} runs")
    print(f"{'stage (s)':24s}" + "".join(f"{name:>26s}" for name, _, _ in codes))

    def row(label: str, values: list[list[float]], fmt: str = "{:.2f}") -> None:
        cells = []
        for v in values:
            cell = fmt.format(statistics.median(v)) + (f" ({fmt.format(min(v))}-{fmt.format(max(v))})"
                                                       if len(v) > 1 else "")
            cells.append(f"{cell:>26s}")
        print(f"{label:24s}" + "".join(cells))

    for s in STAGES:
        row(s, [[x["stages"][s] for x in runs[n]] for n, _, _ in codes])
    row("total per image", [[x["total_s"] for x in runs[n]] for n, _, _ in codes])
    row("compile (worker start)", [[x["compile_s"] for x in runs[n]] for n, _, _ in codes], "{:.1f}")
    row("peak RSS (MiB)", [[x["peak_rss_mib"] for x in runs[n]] for n, _, _ in codes], "{:.0f}")
    row("RSS after encoders", [[x["rss"]["sam2 encoder"] for x in runs[n]] for n, _, _ in codes], "{:.0f}")
    for name, _, mode in codes:
        print(f"{name}: compile_decoder={runs[name][0]['compile_decoder']}, proposals {runs[name][0]['proposals']}, "
              f"detections {runs[name][0]['detections']}")
    base = codes[0][0]
    for name, _, _ in codes[1:]:
        print(f"{name} vs {base}: {compare(work / f'{base}.npz', work / f'{name}.npz')}")


if __name__ == "__main__":
    main()
