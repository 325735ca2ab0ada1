"""Speed of the backend's jobs (issue 5), side by side in one run on one machine.

  python bench/bench_refresh.py                                   # CPU, small models (docs/benchmarks.md)
  python bench/bench_refresh.py --tasks 100,300,1000 --workers 1,2 --jobs 8 --controls polygon,rectangle

What runs is the product's own code: backend.jobs on a fake Label Studio (bench/fake_ls.py, real
HTTP), the real Redis store, the embedded queue for the refresh and real `python -m backend.queueing.worker`
processes for the throughput. Models are built with random weights (timing does not depend on the
weight values; what the predictions contain does, so only their counts are reported).

1. cold prediction per image (backend.jobs.predict.predict_task: fetch + propose + match + convert) vs the same task
   again (image and proposals from the caches) and their ratio;
2. ANNOTATION_CREATED webhook (a brush reference) -> updated predictions posted to LS for N cached
   tasks: bank update / re-score / posting, and a linear fit of the total against N. The N tasks
   share the proposals of the images of (1), so registering them costs nothing;
3. memory bank bytes per reference vs the reference code's 37*37*D*4 B;
4. peak memory (max RSS of this process and of the workers; CUDA max allocated on a GPU);
5. throughput of 1 and 2 RQ workers on M predict jobs with distinct images (no cache hits).
"""
from __future__ import annotations

import argparse
import io
import math
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from unittest.mock import patch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402
import redis  # noqa: E402
import torch  # noqa: E402
from label_studio_sdk.converter.brush import mask2rle  # noqa: E402
from PIL import Image  # noqa: E402
from rq.exceptions import NoSuchJobError  # noqa: E402
from rq.job import Job  # noqa: E402
from rq.worker_registration import WORKERS_BY_QUEUE_KEY  # noqa: E402

from backend import runtime  # noqa: E402
from backend.delivery import bulk as bulk_delivery
from backend.jobs import refresh as refresh_job
from backend.jobs.context import JobContext
from backend.jobs.predict import predict_task
from backend.jobs.webhook import apply_webhook
from backend import queueing
from backend.settings import Settings  # noqa: E402
from backend.storage import label_configs  # noqa: E402
from backend.storage.store import RedisStore  # noqa: E402
from backend.storage.tasks_registry import result_hash  # noqa: E402
from bench_model import random_bank, synthetic_image  # noqa: E402
from cli_args import add_model_args  # noqa: E402
from fake_ls import FakeLabelStudio  # noqa: E402

TOKEN = uuid.uuid4().hex + "0badcafe"   # a legacy-token-shaped key for the fake LS (40 hex)
_LABELS = '<Label value="Cat"/><Label value="Dog"/>'
CONTROLS = {  # --controls: the prediction outputs of the label config
    "brush": f'<BrushLabels name="brush" toName="image">{_LABELS}</BrushLabels>',
    "polygon": f'<PolygonLabels name="poly" toName="image">{_LABELS}</PolygonLabels>',
    "rectangle": f'<RectangleLabels name="bbox" toName="image">{_LABELS}</RectangleLabels>',
}
REF_SEED = 10_000          # image seeds: references from here, targets from 0 (never the same image)
REF_BYTES_PER_DIM = 37 * 37 * 4  # reference code: a 37x37 patch map of D float32 per reference


# ------------------------------------------------------------------------------------ helpers
@dataclass
class Stopwatch:
    """Seconds and calls accumulated per name by wrapped functions (thread-safe: with several
    re-score threads, a name's seconds are summed over threads)."""

    seconds: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                with self.lock:
                    self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
                    self.calls[name] = self.calls.get(name, 0) + 1
        return timed

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()

    def s(self, name: str) -> float:
        return self.seconds.get(name, 0.0)


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def label_config(controls: list[str]) -> str:
    return "\n".join(['<View>', '  <Image name="image" value="$image"/>',
                      *(f"  {CONTROLS[c]}" for c in controls), "</View>"])


def reference_region(h: int, w: int, label: str, rid: str, brush: bool) -> dict:
    """The rectangle rows h/4..h/2, columns w/4..w/2 as LS sends it: a brush region (RLE of the
    0/255 mask) or, without a BrushLabels control, a polygon (percent coordinates)."""
    y0, y1, x0, x1 = h // 4, h // 2, w // 4, w // 2
    region = {"id": rid, "to_name": "image", "original_width": w, "original_height": h, "image_rotation": 0}
    if brush:
        mask = np.zeros((h, w), dtype=np.uint8)
        mask[y0:y1, x0:x1] = 255
        return {**region, "from_name": "brush", "type": "brushlabels",
                "value": {"format": "rle", "rle": mask2rle(mask), "brushlabels": [label]}}
    pts = [[100 * x / w, 100 * y / h] for x, y in ((x0, y0), (x1, y0), (x1, y1), (x0, y1))]
    return {**region, "from_name": "poly", "type": "polygonlabels",
            "value": {"points": pts, "closed": True, "polygonlabels": [label]}}


def wait_jobs(job_ids: list[str], timeout: float) -> tuple[list, float]:
    """(JobInfo of each job, perf_counter when all were seen done); polls every 10 ms."""
    end = time.monotonic() + timeout
    while True:
        infos = queueing.fetch_many(job_ids)
        if all(i is not None and i.done for i in infos):
            return infos, time.perf_counter()
        if time.monotonic() > end:
            raise RuntimeError(f"jobs not done after {timeout} s: {[i and i.status for i in infos]}")
        time.sleep(0.01)


def settings_env(args, model_dir: Path, ls_url: str, queue_prefix: str, redis_url: str | None) -> dict[str, str]:
    """The environment of the backend (this process's Settings and the workers' processes)."""
    env = {"MODEL_DIR": str(model_dir), "LABEL_STUDIO_URL": ls_url, "LABEL_STUDIO_API_KEY": TOKEN,
           "NTT_SAM_MODEL": args.sam, "NTT_DINO_MODEL": args.dino, "NTT_RANDOM_WEIGHTS": "1",
           "NTT_DEVICE": args.device or "auto", "NTT_SAM_IMAGE_SIZE": str(args.sam_image_size),
           "NTT_DINO_IMAGE_SIZE": str(args.dino_image_size), "NTT_POINTS_PER_SIDE": str(args.points_per_side),
           "NTT_BF16": "1" if args.bf16 else "0", "SCORE_THRESHOLD": str(args.score_threshold),
           "NTT_QUEUE_PREFIX": queue_prefix, "REFRESH_THREADS": str(args.refresh_threads), "LOG_LEVEL": "WARNING"}
    if redis_url:
        env["REDIS_URL"] = redis_url
    return env


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{os.cpu_count()} CPU cores ({cpu}){gpu}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch threads")


# ------------------------------------------------------------------------------------ the bench
class Bench:
    def __init__(self, args, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.h, self.w = (int(v) for v in args.image_size.split("x"))
        self.controls = [c.strip() for c in args.controls.split(",") if c.strip()]
        self.config = label_config(self.controls)
        self.prefix = f"bench-{uuid.uuid4().hex[:10]}"
        self.load = os.getloadavg()
        self.ls = FakeLabelStudio(TOKEN)
        self.sw = Stopwatch()
        self.job_ids: list[str] = []
        self._next_task = 1
        settings = Settings.from_env(settings_env(args, tmp / "main", self.ls.url, self.prefix, None))
        runtime.reset()
        # no REDIS_URL in the settings: the refresh runs on the embedded queue thread; the store is
        # Redis (as with workers) or, with --redis-url '', the embedded deployment's SQLiteStore
        self.store = RedisStore(args.redis_url, prefix=f"{self.prefix}:") if args.redis_url else None
        if self.store is not None:
            self.store.redis.ping()
            runtime.configure(settings=settings, store=self.store)
        else:
            runtime.configure(settings=settings)
        t0 = time.perf_counter()
        self.engine = runtime.get_engine()
        self.load_s = time.perf_counter() - t0
        self.device = self.engine.device
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def _instrument(self) -> None:
        """Time the model calls and cache reads of the current runtime's engine and cache."""
        engine, cache = runtime.get_engine(), runtime.get_proposal_cache()
        for obj, name, label in ((engine, "propose", "propose"), (engine, "match", "match"),
                                 (cache, "get", "cache read")):
            if name not in vars(obj):
                setattr(obj, name, self.sw.wrap(label, getattr(obj, name)))

    def predict_one(self, pid: int, task: dict) -> dict:
        """predict_task of a fake-LS task, queued as the web queues it (id, image URL, config hash)."""
        return predict_task(pid, task["id"], task["data"]["image"], label_configs.put(runtime.get_store(), self.config))

    def task(self, pid: int, seed: int) -> dict:
        """A new fake-LS task showing a new synthetic image."""
        tid = self._next_task
        self._next_task += 1
        return self.ls.add_task(pid, tid, f"img{tid}.png", png(synthetic_image(self.h, self.w, seed=seed)))

    def reference(self, pid: int, annotation_id: int, seed: int, label: str) -> tuple[dict, float, float]:
        """ANNOTATION_CREATED with one region (brush when the config has one) on a new reference task.

        Returns (job result, perf_counter at the webhook call, seconds the call took)."""
        task = self.task(pid, seed)
        region = reference_region(self.h, self.w, label, f"r{annotation_id}", "brush" in self.controls)
        annotation = {"id": annotation_id, "task": task["id"], "was_cancelled": False, "result": [region]}
        # saved in LS first (the job reads it back from there); LS ids are unique, so an id reused
        # for another project's identical bank moves there
        self.ls.delete_annotation(annotation_id)
        self.ls.save_annotation(annotation)
        payload = {"action": "ANNOTATION_CREATED", "task": task, "annotation": annotation,
                   "project": {"id": pid, "label_config": self.config}}
        t0 = time.perf_counter()
        out = apply_webhook(pid, "ANNOTATION_CREATED", payload)
        seconds = time.perf_counter() - t0
        if out.get("refresh_job"):
            self.job_ids.append(out["refresh_job"])
        return out, t0, seconds

    # ------------------------------------------------------------------ 1. cold vs cache hit
    def predict(self) -> dict:
        pid, n = 1, self.args.images
        self.ls.add_project(pid, self.config)
        out, _, _ = self.reference(pid, annotation_id=1, seed=REF_SEED, label="Cat")
        wait_jobs([out["refresh_job"]], 60)
        self._instrument()
        self.predict_one(pid, self.task(pid, seed=9_999))  # warm-up, not counted
        tasks = [self.task(pid, seed=i) for i in range(n)]
        rows = {}
        for phase in ("cold", "hit"):
            times, parts, items = [], [], []
            for task in tasks:
                self.sw.reset()
                t0 = time.perf_counter()
                items.append(self.predict_one(pid, task))
                times.append(time.perf_counter() - t0)
                parts.append(dict(self.sw.seconds))
            rows[phase] = (times, parts, items)
        cold_t, cold_p, cold_i = rows["cold"]
        hit_t, hit_p, hit_i = rows["hit"]
        same = sum(result_hash(a["result"]) == result_hash(b["result"]) and a["score"] == b["score"]
                   for a, b in zip(cold_i, hit_i))
        registry = runtime.get_registry()
        return {
            "pid": pid, "templates": [registry.get(pid, t["id"]) for t in tasks],
            "cold": statistics.median(cold_t), "hit": statistics.median(hit_t),
            "cold_propose": statistics.median(p.get("propose", 0.0) for p in cold_p),
            "cold_match": statistics.median(p.get("match", 0.0) for p in cold_p),
            "hit_read": statistics.median(p.get("cache read", 0.0) for p in hit_p),
            "hit_match": statistics.median(p.get("match", 0.0) for p in hit_p),
            "hit_proposes": sum(p.get("propose", 0.0) > 0 for p in hit_p),
            "identical": same, "images": n, "regions": statistics.median(len(i["result"]) for i in cold_i),
            "bank_version": runtime.get_bank_store().version(pid),
        }

    # ------------------------------------------------------------------ 2. webhook -> refresh of N
    def refresh(self, k: int, n: int, templates: list, version0: str) -> dict:
        pid = 10 + k
        self.ls.add_project(pid, self.config)
        out, _, _ = self.reference(pid, annotation_id=1, seed=REF_SEED, label="Cat")  # the bank of (1)
        wait_jobs([out["refresh_job"]], 60)
        if runtime.get_bank_store().version(pid) != version0:  # the templates' results need that bank
            raise RuntimeError("the same reference gave another bank version")
        changes = {}
        for i in range(n):
            tid = self._next_task
            self._next_task += 1
            t = templates[i % len(templates)]
            self.ls.add_task(pid, tid, image_url=t.image_url)  # LS lists it (and the prediction below)
            changes[tid] = {"image_url": t.image_url, "image_sha256": t.image_sha256,
                            "proposal_key": t.proposal_key, "result_hash": t.result_hash,
                            "model_version": t.model_version,
                            "prediction_id": self.ls.add_prediction(tid, [], t.model_version)}
        runtime.get_registry().update(pid, changes)

        self.sw.reset()
        writes0 = self.ls.writes()
        timed = [(refresh_job, "rescore_cached", "rescore"), (refresh_job, "deliver", "post"), (bulk_delivery, "plan", "post"),
                 (bulk_delivery, "post", "post"), (bulk_delivery, "retire", "post")]
        with ExitStack() as stack:
            for obj, name, label in timed:
                stack.enter_context(patch.object(obj, name, self.sw.wrap(label, getattr(obj, name))))
            out, t0, bank_s = self.reference(pid, annotation_id=2, seed=REF_SEED + 1 + k, label="Dog")
            (info,), t1 = wait_jobs([out["refresh_job"]], 600)
        if info.status != "finished":
            raise RuntimeError(f"refresh job {info.status}: {info.error}")
        writes = {key: v - writes0[key] for key, v in self.ls.writes().items()}
        total = t1 - t0
        rescore, post = self.sw.s("rescore"), self.sw.s("post")
        return {"n": n, "total": total, "bank": bank_s, "rescore": rescore, "post": post, "ls": writes["write_s"],
                "read": self.sw.s("cache read"), "match": self.sw.s("match"),
                "other": total - bank_s - rescore - post, "result": info.result,
                "patches": writes["PATCH"], "posts": writes["POST"] + writes["IMPORT"], "proposes": self.sw.calls.get("propose", 0)}

    def rescore_threads(self, pid: int) -> dict:
        """backend.jobs.refresh.rescore_cached over every registered task of `pid` (cache read + match + regions, no
        posting) with REFRESH_THREADS = 1 and = --refresh-threads, alternated, best of 2 each."""
        records = runtime.get_registry().all(pid)
        bank = runtime.get_bank_store().get(pid)
        settings = runtime.get_settings()
        best: dict[int, float] = {}
        try:
            for threads in (1, self.args.refresh_threads) * 2:
                runtime.configure(settings=replace(settings, refresh_threads=threads))
                t0 = time.perf_counter()
                done = refresh_job.rescore_cached(JobContext.for_project(pid), bank, records)
                best[threads] = min(best.get(threads, math.inf), time.perf_counter() - t0)
                if len(done) != len(records):
                    raise RuntimeError(f"{len(records) - len(done)} tasks were not re-scored")
        finally:
            runtime.configure(settings=settings)
        return {"n": len(records), "threads": self.args.refresh_threads, "seconds": best}

    # ------------------------------------------------------------------ 3. bank bytes
    def bank_bytes(self, pid: int) -> dict:
        bank = runtime.get_bank_store().get(pid)
        synthetic = random_bank(self.engine.dino.embed_dim, 5, 10)
        return {"dim": self.engine.dino.embed_dim, "project_refs": len(bank),
                "project": len(bank.to_bytes()) / len(bank),
                "synthetic_refs": len(synthetic), "synthetic": len(synthetic.to_bytes()) / len(synthetic)}

    # ------------------------------------------------------------------ 5. RQ workers
    def workers(self, count: int) -> dict:
        args = self.args
        qprefix = f"{self.prefix}-w{count}"
        env_vars = settings_env(args, self.tmp / f"w{count}", self.ls.url, qprefix, args.redis_url)
        settings = Settings.from_env(env_vars)
        runtime.reset()
        runtime.configure(settings=settings, store=RedisStore(args.redis_url, prefix=f"{qprefix}:"),
                          engine=self.engine)
        pid = 1
        out, _, _ = self.reference(pid, annotation_id=1, seed=REF_SEED, label="Cat")  # bank in Redis
        threads = args.worker_threads or max(1, (os.cpu_count() or 1) // count)
        env = {**os.environ, **env_vars, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads),
               "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
        log_paths = [self.tmp / f"worker-{count}-{i}.log" for i in range(count)]
        logs = [open(path, "w") for path in log_paths]
        procs = [subprocess.Popen([sys.executable, "-m", "backend.queueing.worker"], cwd=ROOT, env=env,
                                  stdout=log, stderr=subprocess.STDOUT) for log in logs]
        conn = redis.Redis.from_url(args.redis_url)
        try:
            key = WORKERS_BY_QUEUE_KEY % settings.queue_name("predict")
            end = time.monotonic() + 300
            while conn.scard(key) < count:  # a worker registers once its engine is loaded
                if time.monotonic() > end or any(p.poll() is not None for p in procs):
                    tail = log_paths[0].read_text()[-2000:]
                    raise RuntimeError(f"{count} worker(s) did not start; first worker's log:\n{tail}")
                time.sleep(0.1)
            wait_jobs([out["refresh_job"]], 120)

            def submit(task: dict, tag: str) -> str:
                jid = f"{qprefix}-{tag}-{task['id']}"
                self.job_ids.append(jid)
                return queueing.enqueue("backend.jobs.predict.predict_task", pid, task["id"], task["data"]["image"],
                                        label_configs.put(runtime.get_store(), self.config), queue="predict",
                                        job_id=jid, retries=0)

            seed0 = 1_000 * (count + 1)
            warm = [submit(self.task(pid, seed0 + 900 + i), "warm") for i in range(count)]  # one per worker
            wait_jobs(warm, 300)
            tasks = [self.task(pid, seed0 + i) for i in range(args.jobs)]
            t0 = time.perf_counter()
            ids = [submit(t, "job") for t in tasks]
            infos, t1 = wait_jobs(ids, 600)
            failed = [i for i in infos if i.status != "finished"]
            if failed:
                raise RuntimeError(f"{len(failed)} predict job(s) failed: {failed[0].error}")
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            for log in logs:
                log.close()
        seconds = t1 - t0
        return {"workers": count, "threads": threads, "jobs": args.jobs, "seconds": seconds,
                "per_s": args.jobs / seconds}

    def cleanup(self) -> None:
        """Delete this run's jobs and every Redis key under its prefixes."""
        if self.store is not None:
            conn = self.store.redis
            for jid in self.job_ids:
                try:
                    Job.fetch(jid, connection=conn, serializer=queueing.SERIALIZER).delete()
                except NoSuchJobError:
                    pass
            for pattern in (f"{self.prefix}*", f"rq:*{self.prefix}*"):
                for key in conn.scan_iter(match=pattern):
                    conn.delete(key)
        self.ls.close()
        runtime.reset()


# ------------------------------------------------------------------------------------ report
def report(b: Bench, pred: dict, refreshes: list[dict], threads: dict | None, bank: dict,
           workers: list[dict]) -> None:
    a = b.args
    mb = 2**20
    print(f"\n== bench_refresh: {a.sam} @ {a.sam_image_size} + {a.dino} @ {a.dino_image_size}, grid "
          f"{a.points_per_side}x{a.points_per_side}, image {b.h}x{b.w}, bf16={a.bf16}, device {b.device}, "
          f"random weights (models built in {b.load_s:.1f} s)")
    print(f"   machine: {machine()}; load average {b.load[0]:.2f} at start, "
          f"{os.getloadavg()[0]:.2f} at the end (other processes share the cores)")
    print(f"   label config: {' + '.join(b.controls)} controls; SCORE_THRESHOLD={a.score_threshold}; "
          f"{pred['regions']:.0f} regions per image (median)")
    rows = [
        ("cold prediction per image", f"{pred['cold']:.3f} s",
         f"propose {pred['cold_propose']:.3f} + match {pred['cold_match']:.3f} + fetch/convert/registry "
         f"{pred['cold'] - pred['cold_propose'] - pred['cold_match']:.3f}; median of {pred['images']}"),
        ("cache-hit re-score per image", f"{pred['hit']:.4f} s",
         f"cache read {pred['hit_read']:.4f} + match {pred['hit_match']:.4f} + fetch/convert/registry "
         f"{pred['hit'] - pred['hit_read'] - pred['hit_match']:.4f}; propose ran on {pred['hit_proposes']}"),
        ("cold / cache-hit ratio", f"{pred['cold'] / pred['hit']:.1f}x",
         f"identical results on {pred['identical']}/{pred['images']} images"),
    ]
    for r in refreshes:
        rows.append((f"webhook -> predictions posted, N={r['n']}", f"{r['total']:.2f} s",
                     f"{r['total'] / r['n'] * 1e3:.2f} ms/task; {r['result']['rescored']} re-scored, "
                     f"{r['result']['changed']} changed, {r['patches'] + r['posts']} posted "
                     f"({'bulk import' if r['result']['bulk'] else 'PATCH per task'})"))
    if refreshes:
        big = refreshes[-1]
        core = big["read"] + big["match"]
        rows.append((f"cache read + match only, N={big['n']}", f"{core:.2f} s",
                     f"{core / big['n'] * 1e3:.2f} ms/task: the method's share of the refresh (no regions, "
                     f"no posting{'; thread-seconds over the re-score threads' if a.refresh_threads > 1 else ''})"))
    if threads:
        one, many = threads["seconds"][1], threads["seconds"][threads["threads"]]
        rows.append((f"re-score N={threads['n']}, {threads['threads']} vs 1 threads", f"x{one / many:.2f}",
                     f"{many:.3f} s vs {one:.3f} s (REFRESH_THREADS; cache read + match + regions, "
                     f"no posting; best of 2 each, alternated)"))
    if len(refreshes) >= 2:
        ns = np.array([r["n"] for r in refreshes], float)
        slope, icpt = np.polyfit(ns, [r["total"] for r in refreshes], 1)
        rows.append(("refresh growth with N (linear fit)", f"{slope * 1e3:.2f} ms/task",
                     f"total ~= {icpt:.2f} s + {slope * 1e3:.2f} ms x N over N = "
                     f"{', '.join(str(int(n)) for n in ns)}"))
    rows.append(("bank bytes per reference", f"{bank['synthetic']:.0f} B",
                 f"{bank['synthetic_refs']}-ref bank, D={bank['dim']} ({bank['project']:.0f} B/ref in the "
                 f"{bank['project_refs']}-ref project bank); reference code: "
                 f"{REF_BYTES_PER_DIM * bank['dim'] / 1e6:.1f} MB with this D, "
                 f"{REF_BYTES_PER_DIM * 1024 / 1e6:.1f} MB with DINOv2-L"))
    rss_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024      # KiB on Linux
    rss_workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    rows.append(("peak memory, this process", f"{rss_self:.0f} MiB",
                 f"max RSS (engine, caches, fake LS, refreshes of up to {max(r['n'] for r in refreshes)} tasks)"
                 if refreshes else "max RSS (engine, caches, fake LS)"))
    if workers:
        rows.append(("peak memory, one worker", f"{rss_workers:.0f} MiB",
                     "max RSS of the largest worker process"))
    if b.device.type == "cuda":
        rows.append(("peak CUDA memory, this process", f"{torch.cuda.max_memory_allocated() / mb:.0f} MiB",
                     "torch.cuda.max_memory_allocated"))
    base = workers[0]["per_s"] if workers else None
    for w in workers:
        rows.append((f"throughput, {w['workers']} RQ worker(s)", f"{w['per_s']:.2f} img/s",
                     f"{w['jobs']} predict jobs in {w['seconds']:.1f} s, {w['threads']} torch thread(s) each; "
                     f"x{w['per_s'] / base:.2f} vs {workers[0]['workers']} worker(s)"))
    print(f"\n{'metric':44s} {'value':>12s}  notes")
    for name, value, note in rows:
        print(f"{name:44s} {value:>12s}  {note}")

    print(f"\nrefresh breakdown (seconds)\n{'N':>6s} {'total':>8s} {'bank upd':>8s} {'re-score':>8s} "
          f"{'(read':>8s} {'match':>8s} {'convert)':>8s} {'posting':>8s} {'(fakeLS)':>8s} {'other':>8s} "
          f"{'ms/task':>8s} {'posted':>6s} {'proposed':>8s}")
    for r in refreshes:
        # with several threads, read and match are thread-seconds: the rest of the wall time is not "convert"
        convert = f"{r['rescore'] - r['read'] - r['match']:8.3f}" if a.refresh_threads == 1 else f"{'-':>8s}"
        print(f"{r['n']:6d} {r['total']:8.3f} {r['bank']:8.3f} {r['rescore']:8.3f} {r['read']:8.3f} "
              f"{r['match']:8.3f} {convert} {r['post']:8.3f} {r['ls']:8.3f} {r['other']:8.3f} "
              f"{r['total'] / r['n'] * 1e3:8.2f} {r['patches'] + r['posts']:6d} {r['proposes']:8d}")
    print("  bank upd: apply_webhook (fetch the reference image, DINOv2 descriptor, atomic bank write); "
          "re-score: cached proposals -> match -> LS regions (read and match summed over the "
          f"{b.args.refresh_threads} re-score threads); posting: PATCHes or bulk import + old-version delete (+ registry), of which "
          "(fakeLS) the fake LS's own handling in this process; "
          "other: queue hop, registry reads, progress")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap, sam="sam2.1-t", sam_image_size=256, dino_image_size=224, points_per_side=4,
                   image_size="240x320")
    ap.add_argument("--device", default=None, help="cpu, cuda (default: CUDA when present)")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--controls", default="brush,polygon,rectangle",
                    help=f"prediction controls of the label config, from {', '.join(CONTROLS)}")
    ap.add_argument("--score-threshold", type=float, default=0.0,
                    help="SCORE_THRESHOLD (0: random-weight scores are low; keep every region)")
    ap.add_argument("--images", type=int, default=4, help="distinct images timed cold and as cache hits")
    ap.add_argument("--tasks", default="100,300,1000", help="comma-separated N of cached tasks to refresh")
    ap.add_argument("--workers", default="1,2", help="comma-separated RQ worker counts ('' to skip)")
    ap.add_argument("--jobs", type=int, default=8, help="predict jobs per worker count (distinct images)")
    ap.add_argument("--worker-threads", type=int, default=1,
                    help="torch threads per worker (0: CPU cores / workers); 1 keeps the 1-vs-2 comparison "
                         "about workers, and OpenMP threads stall on a busy shared machine")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of this process (0: torch default)")
    ap.add_argument("--refresh-threads", type=int, default=Settings().refresh_threads,
                    help="REFRESH_THREADS of the refreshes (default: the product's, CPU cores up to 8); "
                         "> 1 also times re-scoring with 1 thread, side by side")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0",
                    help="Redis for the store and the workers ('': embedded SQLiteStore, no workers)")
    args = ap.parse_args(argv)
    unknown = {c.strip() for c in args.controls.split(",")} - set(CONTROLS)
    if unknown:
        ap.error(f"unknown controls {sorted(unknown)}; choose from {', '.join(CONTROLS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    ns = [int(v) for v in args.tasks.split(",") if v.strip()]
    counts = [int(v) for v in args.workers.split(",") if v.strip()]
    if counts and not args.redis_url:
        ap.error("RQ workers need Redis: pass --redis-url or --workers ''")

    with tempfile.TemporaryDirectory(prefix="ntt-bench-") as tmp:
        b = Bench(args, Path(tmp))
        try:
            print(f"[1/5] cold vs cache hit on {args.images} images", flush=True)
            pred = b.predict()
            refreshes = []
            for k, n in enumerate(ns):
                print(f"[2/5] webhook -> refresh of N={n} cached tasks", flush=True)
                refreshes.append(b.refresh(k, n, pred["templates"], pred["bank_version"]))
            threads = None
            if ns and args.refresh_threads > 1:
                print(f"[2/5] re-score N={ns[-1]} with 1 and {args.refresh_threads} threads", flush=True)
                threads = b.rescore_threads(10 + len(ns) - 1)
            bank = b.bank_bytes(10 + len(ns) - 1 if ns else pred["pid"])
            workers = []
            for c in counts:
                print(f"[5/5] {args.jobs} predict jobs on {c} RQ worker(s)", flush=True)
                workers.append(b.workers(c))
            report(b, pred, refreshes, threads, bank, workers)
        finally:
            b.cleanup()


if __name__ == "__main__":
    main()
