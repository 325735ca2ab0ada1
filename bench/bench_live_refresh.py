"""Webhook -> updated predictions in a REAL Label Studio, end to end, for N already-predicted tasks.

Everything is the deployed product: Label Studio sends the ANNOTATION_CREATED webhook, our web
process queues the bank update, an RQ worker updates the bank and refreshes the project from the
proposal cache, and the new predictions are written to Label Studio. The clock runs from the
annotation's creation (the API call that makes LS fire the webhook) until Label Studio holds exactly
one prediction of the new model version per task and none of an older one of ours (the bulk
refresh; with LS_BULK_REFRESH=0 unchanged tasks keep the older version and this never settles).

  python bench/bench_live_refresh.py --ls-url http://127.0.0.1:8080 --api-key TOKEN \\
      --backend-url http://127.0.0.1:9090 --tasks 100,1000
  ... --train --tasks 200      # "Start training" on 200 tasks (one annotated) until all are posted

The backend must already run against that Label Studio (LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY)
with at least one worker. Per N: a new project (deleted at the end) whose N tasks all show one of 4
uploaded images (so the cold predictions cost 4 model runs; the other tasks hit the caches, as
re-labelled tasks do), the backend connected, one reference annotation, "Retrieve predictions" for
every task, then the timed second annotation.
"""
from __future__ import annotations

import argparse
import io
import sys
import time

import numpy as np
import requests
from PIL import Image, ImageDraw

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <PolygonLabels name="poly" toName="image"><Label value="Cat"/><Label value="Dog"/></PolygonLabels>
  <RectangleLabels name="bbox" toName="image"><Label value="Cat"/><Label value="Dog"/></RectangleLabels>
</View>"""
W, H = 96, 72
CAT, DOG = (12, 12, 48, 48), (60, 30, 88, 64)


def picture(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(90, 170, size=(H, W, 3), dtype=np.uint8), "RGB")
    draw = ImageDraw.Draw(im)
    draw.ellipse(CAT, fill=(210, 40, 40))
    draw.rectangle(DOG, fill=(40, 60, 200))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def polygon(box: tuple[int, int, int, int], label: str, rid: str) -> dict:
    x0, y0, x1, y1 = box
    pts = [[100 * x / W, 100 * y / H] for x, y in ((x0, y0), (x1, y0), (x1, y1), (x0, y1))]
    return {"id": rid, "from_name": "poly", "to_name": "image", "type": "polygonlabels",
            "original_width": W, "original_height": H, "image_rotation": 0,
            "value": {"points": pts, "closed": True, "polygonlabels": [label]}}


class LS:
    def __init__(self, url: str, key: str) -> None:
        self.url, self.session = url.rstrip("/"), requests.Session()
        self.session.headers["Authorization"] = f"Token {key}"

    def call(self, method: str, path: str, **kw):
        r = self.session.request(method, f"{self.url}{path}", timeout=600, **kw)
        if r.status_code >= 400:
            raise RuntimeError(f"{method} {path}: HTTP {r.status_code} {r.text[:300]}")
        return r.json() if r.content else None


def wait(predicate, timeout: float, what: str, interval: float = 0.2):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout} s waiting for {what}")


def run(ls: LS, backend_url: str, n: int) -> dict:
    pid = ls.call("POST", "/api/projects", json={"title": f"ntt live refresh {n}", "label_config": CONFIG})["id"]
    try:
        ls.call("POST", f"/api/projects/{pid}/import",
                files={f"f{i}": (f"img{i}.png", picture(i)) for i in range(4)})
        uploads = [t["data"]["image"] for t in ls.call("GET", "/api/tasks", params={"project": pid})["tasks"]]
        ls.call("POST", f"/api/projects/{pid}/import",
                json=[{"image": uploads[i % 4]} for i in range(n - 4)])
        tasks = ls.call("GET", "/api/tasks", params={"project": pid, "page_size": n})["tasks"]
        assert len(tasks) == n, len(tasks)
        ml = ls.call("POST", "/api/ml", json={"url": backend_url, "project": pid, "title": "ntt",
                                              "is_interactive": False})
        version = lambda: ls.call("GET", f"/api/ml/{ml['id']}")["model_version"]  # noqa: E731
        v0 = version()
        first, second = tasks[0]["id"], tasks[1]["id"]
        ls.call("POST", f"/api/tasks/{first}/annotations", json={"result": [polygon(CAT, "Cat", "a")]})
        v1 = wait(lambda: (v := version()) != v0 and v, 120, "the first bank version")
        t0 = time.monotonic()
        out = ls.call("POST", "/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": pid},
                      json={"selectedItems": {"all": True, "excluded": []}})
        retrieve_s = time.monotonic() - t0
        counts = lambda: ls.call("GET", f"/api/projects/{pid}/model-versions/")  # noqa: E731
        # every task gets one (LS asks /predict for all; late ones are posted by the workers)
        predicted = wait(lambda: (k := counts().get(v1, 0)) >= n and k, 600, f"{n} predictions of {v1}", 1.0)

        t0 = time.monotonic()
        ls.call("POST", f"/api/tasks/{second}/annotations", json={"result": [polygon(DOG, "Dog", "b")]})
        v2 = wait(lambda: (v := version()) not in (v0, v1) and v, 120, "the second bank version", 0.1)
        t_version = time.monotonic() - t0

        def settled() -> dict | None:
            ours = {k: v for k, v in counts().items() if k.startswith("ntt-")}
            return ours if ours == {v2: predicted} else None
        final = wait(settled, 900, f"{predicted} predictions of {v2} and no older one of ours", interval=0.1)
        total = time.monotonic() - t0
        return {"n": n, "retrieve_s": retrieve_s, "retrieved": out.get("processed_items"), "version_s": t_version,
                "total_s": total, "final": final, "predicted": predicted}
    finally:
        ls.call("DELETE", f"/api/projects/{pid}/")


def run_training(ls: LS, backend_url: str, n: int) -> dict:
    """"Start training" on a project of n tasks (one annotated): time until every other task holds
    one prediction of the bank's version (posted by the worker through the LS API)."""
    pid = ls.call("POST", "/api/projects", json={"title": f"ntt live train {n}", "label_config": CONFIG})["id"]
    try:
        ls.call("POST", f"/api/projects/{pid}/import",
                files={f"f{i}": (f"img{i}.png", picture(i)) for i in range(4)})
        uploads = [t["data"]["image"] for t in ls.call("GET", "/api/tasks", params={"project": pid})["tasks"]]
        ls.call("POST", f"/api/projects/{pid}/import", json=[{"image": uploads[i % 4]} for i in range(n - 4)])
        tasks = ls.call("GET", "/api/tasks", params={"project": pid, "page_size": n})["tasks"]
        ml = ls.call("POST", "/api/ml", json={"url": backend_url, "project": pid, "title": "ntt",
                                              "is_interactive": False})
        version = lambda: ls.call("GET", f"/api/ml/{ml['id']}")["model_version"]  # noqa: E731
        v0 = version()
        ls.call("POST", f"/api/tasks/{tasks[0]['id']}/annotations", json={"result": [polygon(CAT, "Cat", "a")]})
        v1 = wait(lambda: (v := version()) != v0 and v, 120, "the bank version")
        counts = lambda: ls.call("GET", f"/api/projects/{pid}/model-versions/")  # noqa: E731
        t0 = time.monotonic()
        ls.call("POST", f"/api/ml/{ml['id']}/train")
        wait(lambda: counts().get(v1, 0) >= n - 1, 900, f"{n - 1} predictions of {v1}", interval=0.2)
        return {"n": n, "train_s": time.monotonic() - t0, "final": counts()}
    finally:
        ls.call("DELETE", f"/api/projects/{pid}/")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ls-url", required=True)
    ap.add_argument("--api-key", required=True)
    ap.add_argument("--backend-url", required=True)
    ap.add_argument("--tasks", default="100,1000", help="comma-separated N")
    ap.add_argument("--train", action="store_true", help="time 'Start training' on N tasks instead")
    args = ap.parse_args()
    ls = LS(args.ls_url, args.api_key)
    health = requests.get(f"{args.backend_url}/health", timeout=10).json()
    print(f"backend {health.get('model')} (ready: {health.get('ready')}), Label Studio {args.ls_url}")
    if args.train:
        print(f"{'N':>6} {'train s':>8} {'ms/task':>8}")
        for n in (int(v) for v in args.tasks.split(",") if v.strip()):
            r = run_training(ls, args.backend_url, n)
            print(f"{n:>6} {r['train_s']:>8.2f} {1000 * r['train_s'] / (n - 1):>8.2f}   {r['final']}")
        return
    print(f"{'N':>6} {'retrieve s':>10} {'new version s':>13} {'webhook->LS s':>13} {'ms/task':>8}")
    for n in (int(v) for v in args.tasks.split(",") if v.strip()):
        r = run(ls, args.backend_url, n)
        print(f"{n:>6} {r['retrieve_s']:>10.2f} {r['version_s']:>13.2f} {r['total_s']:>13.2f} "
              f"{1000 * r['total_s'] / r['predicted']:>8.2f}   {r['final']}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
