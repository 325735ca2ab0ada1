"""Posting refreshed predictions to a REAL Label Studio: 1 vs several PATCHes in flight, and bulk.

The refresh job's last stage PATCHes every changed prediction (backend.delivery.post.deliver). Against a real
Label Studio each PATCH is a Django request with database writes, so this stage is mostly waiting.
This script times exactly that code path, side by side for each LS_POST_CONCURRENCY, and the bulk
path of large refreshes (backend.delivery.bulk: plan + imports of up to 1,000 predictions + deleting
the old model version), on one LS:

  python bench/bench_ls_posting.py --ls-url http://127.0.0.1:8080 --api-key TOKEN --tasks 200 --concurrency 1,4,8

It creates a throw-away project (deleted at the end) with N tasks and one prediction each (as an
earlier refresh would have left them), then, per concurrency level, gives every task a new brush +
polygon result of realistic size under a new model_version and times `_deliver`. The registry is the
embedded SQLiteStore, so nothing but LS is involved. Every round is checked afterwards: each task
holds exactly one prediction, of the last model_version posted.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend import runtime  # noqa: E402
from backend.delivery import bulk as bulk_delivery
from backend.delivery.post import deliver  # noqa: E402
from backend.jobs.context import JobContext  # noqa: E402
from backend.jobs.refresh import REFRESH_BATCH  # noqa: E402
from backend.regions.brush_rle import mask_to_ls_rle  # noqa: E402
from backend.settings import Settings  # noqa: E402
from backend.storage.sqlite_store import SQLiteStore  # noqa: E402

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="brush" toName="image"><Label value="Cat"/></BrushLabels>
  <PolygonLabels name="poly" toName="image"><Label value="Cat"/></PolygonLabels>
</View>"""
H, W = 768, 1024


def _result(seed: int) -> list[dict]:
    """One brush region (an ellipse, LS RLE) and one 24-point polygon, as our conversion emits."""
    rng = np.random.default_rng(seed)
    cy, cx, ry, rx = rng.uniform(200, 560), rng.uniform(200, 820), rng.uniform(40, 150), rng.uniform(40, 150)
    yy, xx = np.mgrid[0:H, 0:W]
    mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    pts = [[100 * (cx + rx * np.cos(a)) / W, 100 * (cy + ry * np.sin(a)) / H] for a in t]
    common = {"to_name": "image", "original_width": W, "original_height": H, "image_rotation": 0, "score": 0.8}
    return [{"id": f"b{seed}", "from_name": "brush", "type": "brushlabels",
             "value": {"format": "rle", "rle": mask_to_ls_rle(mask), "brushlabels": ["Cat"]}, **common},
            {"id": f"p{seed}", "from_name": "poly", "type": "polygonlabels",
             "value": {"points": pts, "closed": True, "polygonlabels": ["Cat"]}, **common}]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ls-url", required=True)
    ap.add_argument("--api-key", required=True, help="legacy token or personal access token")
    ap.add_argument("--tasks", type=int, default=200)
    ap.add_argument("--concurrency", default="1,4,8", help="comma-separated LS_POST_CONCURRENCY values")
    ap.add_argument("--rounds", type=int, default=2, help="timed rounds per concurrency (median reported)")
    args = ap.parse_args()
    levels = [int(v) for v in args.concurrency.split(",") if v.strip()]

    settings = Settings.from_env({"LABEL_STUDIO_URL": args.ls_url, "LABEL_STUDIO_API_KEY": args.api_key,
                                  "MODEL_DIR": tempfile.mkdtemp(prefix="ntt-bench-ls-")})
    runtime.reset()
    runtime.configure(settings=settings, store=SQLiteStore())
    client = runtime.get_ls_client(0)
    project = client._request("POST", "api/projects/", json={"title": "ntt posting bench", "label_config": CONFIG})
    pid = int(project["id"])
    try:
        client._request("POST", f"api/projects/{pid}/import",
                        json=[{"image": f"/data/upload/{pid}/x{i}.png"} for i in range(args.tasks)])
        tasks = sorted(t["id"] for t in client._request("GET", "api/tasks/", params={
            "project": pid, "page_size": args.tasks, "fields": "all"})["tasks"])
        runtime.configure(settings=settings)
        registry = runtime.get_registry()
        results = {tid: _result(i) for i, tid in enumerate(tasks)}
        size_kb = statistics.mean(len(json.dumps(r)) for r in results.values()) / 1024
        # the state an earlier refresh leaves: one prediction of ours per task, known to the registry
        first = {tid: {"result": results[tid], "score": 0.8, "model_version": "bench-0"} for tid in tasks}
        registry.update(pid, {tid: {"image_url": f"/x/{tid}.png"} for tid in tasks})
        created = deliver(JobContext.for_project(pid), first)
        assert created["posted"] == len(tasks), created
        print(f"Label Studio {args.ls_url}: project {pid}, {len(tasks)} tasks, result {size_kb:.0f} KiB "
              f"per task (brush RLE + polygon)")
        print(f"{'concurrency':>11} {'median s':>9} {'ms/task':>8} {'speed-up':>9}  rounds")
        base = None
        version = 0

        def check(expected: str) -> None:
            stored = client._request("GET", "api/predictions/", params={"project": pid})
            per_task = sorted(p["task"] for p in stored)
            assert per_task == tasks and {p.get("model_version") for p in stored} == {expected}, (
                len(stored), {p.get("model_version") for p in stored})

        for level in levels + ["bulk"]:
            if level != "bulk":
                runtime.configure(settings=replace(settings, ls_post_concurrency=level))
            times = []
            for _ in range(args.rounds):
                version += 1
                mv = f"bench-{version}"
                items = {tid: {"result": results[tid], "score": 0.8, "model_version": mv} for tid in tasks}
                ctx = JobContext.for_project(pid)  # the settings of this level
                t0 = time.perf_counter()
                if level == "bulk":
                    records = {tid: registry.get(pid, tid) for tid in tasks}
                    retire = bulk_delivery.plan(ctx, records, mv, "bench-")
                    assert retire == [f"bench-{version - 1}"], retire
                    importer = bulk_delivery.Importer(ctx)  # fed as refresh_project does, batch by batch
                    posted = sum(importer.add(dict(list(items.items())[k:k + REFRESH_BATCH]))
                                 for k in range(0, len(tasks), REFRESH_BATCH)) + importer.flush()
                    assert posted == len(tasks) and bulk_delivery.retire(ctx, mv, "bench-") == len(tasks)
                else:
                    counts = deliver(ctx, items)
                    assert counts == {"posted": len(tasks), "skipped": 0, "failed": 0}, counts
                times.append(time.perf_counter() - t0)
                check(mv)
            med = statistics.median(times)
            base = base or med
            print(f"{level:>11} {med:>9.2f} {1000 * med / len(tasks):>8.1f} {base / med:>8.2f}x  "
                  + ", ".join(f"{t:.2f}" for t in times))
    finally:
        client._request("DELETE", f"api/projects/{pid}/")


if __name__ == "__main__":
    main()
