"""Click -> mask latency through the backend (issue 14): POST /predict with a smart tool's `context`,
as Label Studio 1.23 forwards an editor click, timed at the HTTP client, alone and while a batch
job (Start training over many tasks) runs in the same worker.

  HF_HUB_OFFLINE=1 .venv/bin/python bench/click_backend.py              # embedded + 1 RQ worker, CPU
  HF_HUB_OFFLINE=1 .venv/bin/python bench/click_backend.py --modes embedded --cold 4 --warm 12

What runs is the product: the Flask app behind a real HTTP server (werkzeug, threaded) in this
process, Label Studio played by bench/fake_ls.py (task images, the batch job's API calls), and
the jobs run either by the web process's embedded worker thread (`embedded`, no Redis) or by one
`python -m backend.queueing.worker` process on Redis (`rq`, --redis-url). Models have random weights.

Each mode measures, in this order:

1. alone: cold clicks (the first click on a task: the worker fetches its image from LS and runs
   SAM2's image encoder, then the prompt encoder and decoder), then warm clicks (further clicks on
   the tasks clicked last: the embedding is in memory). In `embedded` the image encoder's passes are
   counted: the warm clicks must run none.
2. during a batch: a START_TRAINING webhook on another project of --batch-tasks unlabelled tasks
   (one annotated reference); once the job predicts, cold and warm clicks interleaved (one cold in
   (warm / cold + 1)), each after a think time drawn uniformly from [0, --gap] s (seeded), so
   clicks land anywhere in a batch task. The worker serves a queued click between two batch tasks
   (queueing.serve_interactive), so a click waits for the rest of the task in progress: the batch
   task's time is printed with the figures. When the clicks are done, the batch project's images
   answer 404, so its remaining tasks fail at once and the job ends.

Prompts alternate between one positive click, a positive and a negative click (what the editor
sends after an Alt-click: the context holds every keypoint drawn), and a box.
"""
from __future__ import annotations

import argparse
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402
import redis  # noqa: E402
import requests  # noqa: E402
import torch  # noqa: E402
from rq.worker_registration import WORKERS_BY_QUEUE_KEY  # noqa: E402
from werkzeug.serving import make_server  # noqa: E402

from backend import runtime  # noqa: E402
from backend import queueing
from backend.web.app import create_app  # noqa: E402
from backend.settings import Settings  # noqa: E402
from bench_model import synthetic_image  # noqa: E402
from cli_args import add_model_args  # noqa: E402
from bench_refresh import machine, png, reference_region  # noqa: E402
from fake_ls import FakeLabelStudio, Reply  # noqa: E402 (the Reply class fake_ls checks for)

TOKEN = uuid.uuid4().hex + "0badcafe"   # a legacy-token-shaped key for the fake LS (40 hex)
CLICK_PID, BATCH_PID = 2, 1
XML = """<View>
  <Image name="image" value="$image"/>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="Cat"/><Label value="Dog"/></KeyPointLabels>
  <RectangleLabels name="box" toName="image" smart="true"><Label value="Cat"/><Label value="Dog"/></RectangleLabels>
  <BrushLabels name="brush" toName="image"><Label value="Cat"/><Label value="Dog"/></BrushLabels>
</View>"""
WARM_SET = 3  # warm clicks go to the last tasks clicked (an annotator refining the objects at hand)


class StoppableLS(FakeLabelStudio):
    """The fake LS; once `stop_batch` is set, the batch project's images answer 404 (its job ends)."""

    stop_batch = False

    def handle(self, req, method, path, query):
        if self.stop_batch and path.startswith(f"/data/upload/{BATCH_PID}/"):
            return Reply(404, {"detail": "Not found."})
        return super().handle(req, method, path, query)


def context_region(kind: str, x: float, y: float, w: int, h: int, positive: bool = True) -> dict:
    """A smart-tool region as the editor serialises it (percent of the displayed image)."""
    region = {"original_width": w, "original_height": h, "image_rotation": 0, "id": uuid.uuid4().hex[:10],
              "to_name": "image", "origin": "manual"}
    if kind == "keypoint":
        return {**region, "from_name": "kp", "type": "keypointlabels", "is_positive": positive,
                "value": {"x": x, "y": y, "width": 0.6, "keypointlabels": ["Cat"]}}
    return {**region, "from_name": "box", "type": "rectanglelabels",
            "value": {"x": x * 0.5, "y": y * 0.5, "width": min(100 - x * 0.5, x), "height": min(100 - y * 0.5, y),
                      "rotation": 0, "rectanglelabels": ["Cat"]}}


def prompt_regions(i: int, w: int, h: int) -> list[dict]:
    """Click i's context: one positive click, a positive and a negative click, or a box."""
    x, y = 20 + 60 * ((i * 37) % 100) / 100, 20 + 60 * ((i * 61) % 100) / 100
    return [[context_region("keypoint", x, y, w, h)],
            [context_region("keypoint", x, y, w, h), context_region("keypoint", 100 - x, 100 - y, w, h, False)],
            [context_region("box", x, y, w, h)]][i % 3]


def predict_body(task: dict, regions: list[dict]) -> dict:
    """POST /predict as LS's interactive_annotating sends it: one task, params.context.result."""
    return {"tasks": [{**task, "drafts": [], "annotations": [], "predictions": []}],
            "project": f"{CLICK_PID}.1795705944", "label_config": XML,
            "params": {"login": None, "password": None, "context": {"result": regions}}}


def percentiles(ms: list[float]) -> str:
    if not ms:
        return "no clicks measured"
    p50, p95 = np.percentile(ms, [50, 95])
    return f"p50 {p50:8.1f} ms   p95 {p95:8.1f} ms   n {len(ms):3d}   (min {min(ms):.1f}, max {max(ms):.1f})"


class Run:
    """One deployment mode: the web app on HTTP, its jobs run by the embedded thread or one RQ worker."""

    def __init__(self, args, mode: str, tmp: Path) -> None:
        self.args, self.mode, self.tmp = args, mode, tmp
        self.h, self.w = (int(v) for v in args.image_size.split("x"))
        self.prefix = f"bench-click-{uuid.uuid4().hex[:8]}"
        self.ls = StoppableLS(TOKEN)
        self.ls.add_project(CLICK_PID, XML)
        self.ls.add_project(BATCH_PID, XML)
        self._next_task = 1
        self.encodes = 0
        self.session = requests.Session()
        self.rows: list[tuple[str, str, list[float]]] = []
        self.notes: list[str] = []
        self.empty = 0

    def env(self) -> dict[str, str]:
        a = self.args
        env = {"MODEL_DIR": str(self.tmp / self.mode), "LABEL_STUDIO_URL": self.ls.url, "LABEL_STUDIO_API_KEY": TOKEN,
               "NTT_SAM_MODEL": a.sam, "NTT_DINO_MODEL": a.dino, "NTT_RANDOM_WEIGHTS": "1",
               "NTT_DEVICE": a.device or "auto", "NTT_SAM_IMAGE_SIZE": str(a.sam_image_size),
               "NTT_DINO_IMAGE_SIZE": str(a.dino_image_size), "NTT_POINTS_PER_SIDE": str(a.points_per_side),
               "NTT_COMPILE_DECODER": "1" if a.compile_decoder else "0", "SCORE_THRESHOLD": "0",
               "NTT_QUEUE_PREFIX": self.prefix, "LOG_LEVEL": "WARNING"}
        if self.mode == "rq":
            env["REDIS_URL"] = a.redis_url
        return env

    def task(self, pid: int, seed: int, annotations=()) -> dict:
        tid = self._next_task
        self._next_task += 1
        return self.ls.add_task(pid, tid, f"p{pid}-{tid}.png", png(synthetic_image(self.h, self.w, seed=seed)),
                                annotations=annotations)

    @contextmanager
    def serving(self) -> Iterator[None]:
        """The web app on 127.0.0.1 (and, in `rq`, one worker process) until the block ends."""
        env = self.env()
        runtime.reset()
        runtime.configure(settings=Settings.from_env(env))
        if self.mode == "embedded":
            engine = runtime.get_engine()  # the embedded thread's engine, loaded here to count encodes
            engine.sam.image_encoder.register_forward_hook(self._encoded)
        server = make_server("127.0.0.1", 0, create_app(), threaded=True)
        self.url = f"http://127.0.0.1:{server.server_port}"
        threading.Thread(target=server.serve_forever, daemon=True).start()
        worker = self._start_worker(env) if self.mode == "rq" else None
        try:
            yield
        finally:
            if worker is not None:  # its process group: the worker and RQ's scheduler process it forked
                os.killpg(worker.pid, signal.SIGTERM)  # idle by now: a warm shutdown is immediate
                try:
                    worker.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(worker.pid, signal.SIGKILL)
                    worker.wait()
            server.shutdown()
            self._cleanup()

    def _encoded(self, *_) -> None:
        self.encodes += 1

    def _start_worker(self, env: dict[str, str]) -> subprocess.Popen:
        threads = str(self.args.threads)
        log_path = self.tmp / "worker.log"
        proc = subprocess.Popen([sys.executable, "-m", "backend.queueing.worker"], cwd=ROOT,
                                env={**os.environ, **env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": threads,
                                     "MKL_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1"},
                                stdout=open(log_path, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        conn = redis.Redis.from_url(self.args.redis_url)
        key = WORKERS_BY_QUEUE_KEY % runtime.get_settings().queue_name("interactive")
        end = time.monotonic() + 600
        while conn.scard(key) < 1:  # a worker registers once its engine is loaded
            if time.monotonic() > end or proc.poll() is not None:
                os.killpg(proc.pid, signal.SIGKILL)
                raise RuntimeError(f"the RQ worker did not start; its log:\n{log_path.read_text()[-2000:]}")
            time.sleep(0.1)
        return proc

    def _cleanup(self) -> None:
        """Every Redis key of this run: its queues, registries, jobs and store."""
        if self.mode != "rq":
            return
        conn = redis.Redis.from_url(self.args.redis_url)
        for key in list(conn.scan_iter(match=f"rq:*{self.prefix}*")):
            kind = conn.type(key)
            members = (conn.zrange(key, 0, -1) if kind == b"zset" else conn.lrange(key, 0, -1) if kind == b"list"
                       else [])
            for job_id in members:
                conn.delete(b"rq:job:" + job_id, b"rq:results:" + job_id)
            conn.delete(key)
        for key in conn.scan_iter(match=f"{self.prefix}*"):
            conn.delete(key)

    # ------------------------------------------------------------------ clicks
    def click(self, task: dict, i: int) -> float:
        """One click on `task` through POST /predict; milliseconds until the answer."""
        body = predict_body(task, prompt_regions(i, self.w, self.h))
        t0 = time.perf_counter()
        resp = self.session.post(f"{self.url}/predict", json=body, timeout=600)
        ms = 1e3 * (time.perf_counter() - t0)
        resp.raise_for_status()
        (item,) = resp.json()["results"]
        if "error" in item:
            raise RuntimeError(f"click {i} on task {task['id']} ({self.mode}): {item['error']}")
        self.empty += not item["result"]  # random weights may predict an empty mask: no region
        return ms

    def alone(self) -> None:
        a = self.args
        self.click(self.task(CLICK_PID, 9_999), 0)  # first-call overheads out of the figures
        tasks = [self.task(CLICK_PID, seed) for seed in range(a.cold)]
        before = self.encodes
        cold = [self.click(t, i) for i, t in enumerate(tasks)]
        mid = self.encodes
        warm = [self.click(tasks[-1 - i % min(WARM_SET, len(tasks))], i) for i in range(a.warm)]
        self.rows += [("alone", "cold", cold), ("alone", "warm", warm)]
        if self.mode == "embedded":
            self.notes.append(f"alone: SAM2 image encoder ran {mid - before} times for {len(cold)} cold clicks, "
                              f"{self.encodes - mid} times for {len(warm)} warm clicks")

    def during_batch(self) -> None:
        a = self.args
        ref = self.task(BATCH_PID, 50_000)
        annotation = {"id": 1, "task": ref["id"], "was_cancelled": False,
                      "result": [reference_region(self.h, self.w, "Cat", "r1", brush=True)]}
        self.ls.save_annotation(annotation)
        for seed in range(a.batch_tasks):
            self.task(BATCH_PID, 60_000 + seed)
        warm_tasks = [self.task(CLICK_PID, 70_000 + s) for s in range(WARM_SET)]
        for i, t in enumerate(warm_tasks):
            self.click(t, i)  # opened and clicked before the batch starts: warm
        resp = self.session.post(f"{self.url}/webhook", json={"action": "START_TRAINING", "project": {"id": BATCH_PID}},
                                 timeout=60)
        resp.raise_for_status()
        job_id = resp.json()["job"]
        info = self._wait_job(job_id, lambda j: j.meta.get("stage") == "pre-annotate" or j.done)
        t0, done0 = time.perf_counter(), int(info.meta.get("done") or 0)
        rng = random.Random(14)
        cold, warm, seed = [], [], 80_000
        every = a.warm // max(1, a.cold) + 1
        for i in range(a.cold + a.warm):
            time.sleep(rng.uniform(0, a.gap))
            if queueing.fetch(job_id).done:
                self.notes.append(f"during Start training: the batch ended after {i} of {a.cold + a.warm} "
                                  "clicks (raise --batch-tasks)")
                break
            if i % every == 0 and len(cold) < a.cold or len(warm) >= a.warm:
                task = self.task(CLICK_PID, seed)
                seed += 1
                cold.append(self.click(task, i))
                warm_tasks = warm_tasks[1:] + [task]
            else:
                warm.append(self.click(warm_tasks[-1 - i % WARM_SET], i))
        t1, done1 = time.perf_counter(), int(queueing.fetch(job_id).meta.get("done") or 0)
        self.ls.stop_batch = True  # the remaining batch tasks fail at once
        result = self._wait_job(job_id, lambda j: j.done, timeout=600)
        self.rows += [("during train", "cold", cold), ("during train", "warm", warm)]
        per_task = (t1 - t0) / max(1, done1 - done0)
        self.notes.append(f"during Start training: {done1 - done0} batch tasks predicted while clicking, "
                          f"{per_task:.2f} s per task (clicks included); job {result.status}")

    def _wait_job(self, job_id: str, ready, timeout: float = 600):
        end = time.monotonic() + timeout
        while True:
            info = queueing.fetch(job_id)
            if info is not None and ready(info):
                return info
            if time.monotonic() > end:
                raise RuntimeError(f"job {job_id} not ready after {timeout} s: {info and info.status}")
            time.sleep(0.02)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap, sam="sam2-t", sam_image_size=1024, dino_image_size=518, points_per_side=8,
                   image_size="360x640", points_help="the batch job's SAM2 grid (sets one batch task's time, "
                   "hence a click's wait during the batch)")
    ap.add_argument("--compile-decoder", action="store_true", help="NTT_COMPILE_DECODER=1 (default: eager)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the process running the jobs (1: "
                    "OpenMP threads stall on a busy shared machine)")
    ap.add_argument("--cold", type=int, default=6, help="cold clicks per scenario")
    ap.add_argument("--warm", type=int, default=20, help="warm clicks per scenario")
    ap.add_argument("--batch-tasks", type=int, default=40, help="unlabelled tasks of the Start-training job")
    ap.add_argument("--gap", type=float, default=2.0, help="max think time (s) between clicks during the batch")
    ap.add_argument("--modes", default="embedded,rq", help="comma-separated: embedded, rq")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0", help="Redis of the rq mode")
    args = ap.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if set(modes) - {"embedded", "rq"}:
        ap.error("--modes: embedded and/or rq")
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()[0]
    runs = []
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="click-backend-")))
        logging.basicConfig(filename=tmp / "web.log", level=logging.WARNING)  # the batch's 404s end up here
        for mode in modes:
            run = Run(args, mode, tmp)
            stack.callback(run.ls.close)
            print(f"[{mode}] alone, then during Start training", flush=True)
            with run.serving():
                run.alone()
                run.during_batch()
            runs.append(run)
    h, w = args.image_size.split("x")
    print(f"\n== click_backend: {args.sam} @ {args.sam_image_size} + {args.dino} @ {args.dino_image_size}, image "
          f"{h}x{w}, batch grid {args.points_per_side}x{args.points_per_side}, compiled decoder "
          f"{'on' if args.compile_decoder else 'off'}, random weights")
    print(f"   machine: {machine()}; load average {load0:.2f} at start, {os.getloadavg()[0]:.2f} at the end")
    print("   click -> mask: POST /predict with a context, timed at the client (HTTP, queue, image, SAM2)")
    for run in runs:
        for scenario, emb, ms in run.rows:
            print(f"{run.mode:<9} {scenario:<13} {emb:<5} {percentiles(ms)}")
    for run in runs:
        for note in run.notes:
            print(f"   {run.mode}: {note}")
        print(f"   {run.mode}: {run.empty} clicks answered an empty mask (random weights)")


if __name__ == "__main__":
    main()
