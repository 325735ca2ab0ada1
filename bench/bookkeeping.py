"""START_TRAINING's bookkeeping alone (issue 12): bytes the backend writes to disk and time per task,
for N tasks, for one or more versions of this repository side by side in one run.

  # before (the commit before #12, extracted with `git archive`) vs this tree, N = 1,000 and 10,000:
  .venv/bin/python bench/bookkeeping.py --commit old=d3bc3e8 --checkout new=. --tasks 1000 10000

Each version runs the way users run it: `scripts/run_backend.sh` of that checkout (gunicorn, the
embedded default: no REDIS_URL, a fresh MODEL_DIR), random-weight small models as the tests
configure them, LABEL_STUDIO_URL pointing at bench/fake_ls.py holding one project of N tasks with
small images and no annotation. With an empty memory bank no model runs and no image is fetched, so
what is measured is the bookkeeping: listing the tasks, registering each one, posting each (empty)
prediction, the job's progress. The bench POSTs the START_TRAINING webhook and waits until the fake
has received a prediction for each of the N tasks and /jobs says the job finished.

Measured for the backend (every process of its session: the gunicorn master and its worker):
`write_bytes` of /proc/<pid>/io read just before the webhook and at the end (bytes the processes
caused to be written to the storage layer), wall time from the webhook to the job seen finished,
and the disk usage of MODEL_DIR at the end ("fake LS s": the time the fake spent handling the
prediction writes, on the bench's share of the CPU). The backend only talks to the bench over HTTP,
so any checkout of this repository can be measured; each is byte-compiled before its runs, so no
.pyc written by a late import counts. Versions alternate for each N (they share the
machine's load); `--max-seconds` stops a run early: its row says how many tasks were done, and a
line below gives an extrapolation to N, labelled as such (least-squares quadratic fit of the
bytes and seconds sampled once a second during the run).
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zlib
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fake_ls import FakeLabelStudio, Reply  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PID = 1
TOKEN = uuid.uuid4().hex + "0badcafe"  # legacy-token shaped (40 hex)
XML = ('<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
       '<Label value="Cat"/><Label value="Dog"/></RectangleLabels></View>')
SCRUBBED = ("LABEL_STUDIO_", "NTT_", "BASIC_AUTH_")  # the caller's settings must not leak into a run
SCRUBBED_VARS = ("REDIS_URL", "MODEL_DIR", "CACHE_DIR", "LOCAL_FILES_DOCUMENT_ROOT", "PORT")
TERMINAL = ("finished", "failed", "stopped", "canceled")


def tiny_png(w: int = 16, h: int = 12) -> bytes:
    """A grey RGB PNG (standard library only)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    raw = b"".join(b"\x00" + b"\x80" * (3 * w) for _ in range(h))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


class CountingLS(FakeLabelStudio):
    """The fake LS, counting the tasks that received a prediction (`predicted`, notified through
    `changed`), with the predictions indexed by task so that GET /api/predictions/?task= costs the
    fake O(1) rather than a scan of every prediction (the fake shares the bench's CPU)."""

    def __init__(self, token: str) -> None:
        super().__init__(token)
        self.predicted: set[int] = set()
        self.by_task: dict[int, list[int]] = {}
        self.changed = threading.Condition(self.lock)

    def record(self, kind: str, path: str, body: Any) -> None:
        super().record(kind, path, body)
        items = body if kind == "IMPORT" else [body] if kind == "POST" else []
        self.predicted.update(int(i["task"]) for i in items if isinstance(i, dict) and "task" in i)
        self.changed.notify_all()

    def handle(self, req, method, path, query):
        if method == "GET" and path == "/api/predictions/" and set(query) == {"task"}:
            ids = self.by_task.get(int(query["task"][0]), [])
            return Reply(200, [self.predictions[i] for i in ids if i in self.predictions])
        before = self._next
        reply = super().handle(req, method, path, query)
        for pred_id in range(before, self._next):  # the predictions this request created
            self.by_task.setdefault(int(self.predictions[pred_id]["task"]), []).append(pred_id)
        return reply


def fake_ls(n: int) -> CountingLS:
    """One project of n unannotated tasks, each with its own (tiny) uploaded image."""
    ls = CountingLS(TOKEN)
    ls.add_project(PID, XML)
    image = tiny_png()
    for task_id in range(1, n + 1):
        ls.add_task(PID, task_id, f"img{task_id}.png", image)
    return ls


# ------------------------------------------------------------------------------------ the backend
def session_write_bytes(sid: int) -> int:
    """Sum of write_bytes (/proc/<pid>/io) over the live processes of session `sid`."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[3]) != sid:  # fields after "(comm)": state ppid pgrp session
                continue
            io = Path(entry.path, "io").read_text()
        except (OSError, IndexError, ValueError):
            continue  # exited meanwhile
        total += int(next(ln.split()[1] for ln in io.splitlines() if ln.startswith("write_bytes:")))
    return total


def disk_usage(path: Path) -> int:
    """Bytes allocated on disk under `path` (like du)."""
    return sum(os.lstat(os.path.join(d, f)).st_blocks * 512 for d, _, files in os.walk(path) for f in files)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Backend:
    """`scripts/run_backend.sh` of a checkout, in its own session; its output kept in memory (a log
    file would add to the bytes written)."""

    root: Path
    env: dict[str, str]
    port: int
    proc: subprocess.Popen = field(init=False)
    tail: deque = field(default_factory=lambda: deque(maxlen=60))

    def __post_init__(self) -> None:
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(["bash", "scripts/run_backend.sh"], cwd=self.root, env=self.env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.tail.append(line.rstrip())

    def alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"backend exited ({self.proc.returncode}):\n" + "\n".join(self.tail))

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.alive()
            try:
                if requests.get(f"{self.url}/health", timeout=10).status_code == 200:
                    return
            except requests.RequestException:  # not listening yet, or its worker still importing
                pass
            time.sleep(0.2)
        raise RuntimeError("backend not ready in time:\n" + "\n".join(self.tail))

    def write_bytes(self) -> int:
        return session_write_bytes(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def backend_env(ls_url: str, model_dir: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(SCRUBBED) and k not in SCRUBBED_VARS}
    return {**env, "LABEL_STUDIO_URL": ls_url, "LABEL_STUDIO_API_KEY": TOKEN, "MODEL_DIR": str(model_dir),
            "PORT": str(port), "HF_HUB_OFFLINE": "1", "NTT_RANDOM_WEIGHTS": "1", "NTT_DEVICE": "cpu",
            "NTT_SAM_MODEL": "sam2.1-t", "NTT_DINO_MODEL": "dinov2-s", "NTT_SAM_IMAGE_SIZE": "256",
            "NTT_DINO_IMAGE_SIZE": "112", "NTT_POINTS_PER_SIDE": "2", "NTT_COMPILE_DECODER": "0"}


@contextmanager
def running(root: Path, ls_url: str, model_dir: Path) -> Iterator[Backend]:
    port = free_port()
    backend = Backend(root, backend_env(ls_url, model_dir, port), port)
    try:
        backend.wait_ready()
        yield backend
    finally:
        backend.stop()


# ------------------------------------------------------------------------------------ one run
@dataclass
class Result:
    name: str
    commit: str
    n: int
    done: int = 0
    seconds: float = 0.0
    written: int = 0
    model_dir_bytes: int = 0
    ls_write_s: float = 0.0
    status: str = ""
    samples: list[tuple[float, int, int]] = field(default_factory=list)  # (s, tasks predicted, bytes)


def job_status(backend: Backend, job_id: str | None) -> str | None:
    """The START_TRAINING job's status from GET /jobs (by id when the webhook named it)."""
    if job_id:
        resp = requests.get(f"{backend.url}/jobs", params={"id": job_id}, timeout=10)
        return resp.json().get("status") if resp.ok else None
    jobs = requests.get(f"{backend.url}/jobs", timeout=10).json().get("jobs") or []
    return next((j["status"] for j in jobs if "train_project" in str(j.get("func"))), None)


def run_one(name: str, root: Path, commit: str, n: int, max_seconds: float, work: Path) -> Result:
    """START_TRAINING of n tasks on the backend of `root`; see the module docstring."""
    res = Result(name, commit, n)
    model_dir = Path(tempfile.mkdtemp(prefix=f"{name}-{n}-", dir=work))
    with fake_ls(n) as ls, running(root, ls.url, model_dir) as backend:
        before = backend.write_bytes()
        t0 = time.perf_counter()
        resp = requests.post(f"{backend.url}/webhook", json={"action": "START_TRAINING", "project": {"id": PID}},
                             timeout=30)
        resp.raise_for_status()
        job_id = resp.json().get("job")
        next_check, status = t0, None
        while True:
            with ls.changed:
                ls.changed.wait_for(lambda: len(ls.predicted) >= n, timeout=1.0)
                done = len(ls.predicted)
            now = time.perf_counter()
            res.samples.append((now - t0, done, backend.write_bytes() - before))
            backend.alive()
            if now >= next_check or done >= n:
                status, next_check = job_status(backend, job_id), now + 2.0
                if status in TERMINAL:
                    break
                if done >= n:
                    time.sleep(0.05)  # every task posted: the job is finishing
            if now - t0 > max_seconds:
                status = f"stopped by the bench at {max_seconds:g} s"
                break
        res.seconds = time.perf_counter() - t0
        res.done, res.written, res.status = len(ls.predicted), backend.write_bytes() - before, status or "?"
        res.ls_write_s = ls.writes()["write_s"]
    res.model_dir_bytes = disk_usage(model_dir)
    shutil.rmtree(model_dir, ignore_errors=True)
    return res


# ------------------------------------------------------------------------------------ report
def extrapolate(res: Result) -> str:
    """A stopped run's bytes and seconds at N, from a least-squares fit a + b k + c k^2 of its samples."""
    pts = np.array([s for s in res.samples if s[1] > 0], dtype=float)
    if len(pts) < 3:
        return "too few samples to extrapolate"
    k = pts[:, 1]
    basis = np.stack([np.ones_like(k), k, k * k], axis=1)
    at_n = np.array([1.0, res.n, float(res.n) ** 2])
    secs = float(at_n @ np.linalg.lstsq(basis, pts[:, 0], rcond=None)[0])
    written = float(at_n @ np.linalg.lstsq(basis, pts[:, 2], rcond=None)[0])
    return (f"EXTRAPOLATED (quadratic fit of {len(pts)} samples up to {res.done} tasks, not measured): "
            f"N={res.n:,} would take ~{secs:,.0f} s ({1000 * secs / res.n:.1f} ms/task) and write "
            f"~{written / 1e6:,.0f} MB ({written / 1e3 / res.n:.1f} KB/task)")


HEADER = (f"{'checkout':<22} {'N':>7} {'predicted':>9} {'total s':>9} {'ms/task':>8} {'MB written':>11} "
          f"{'KB/task':>9} {'MODEL_DIR MB':>12} {'fake LS s':>9}  job")


def row(res: Result) -> str:
    per = max(res.done, 1)
    return (f"{res.name + ' ' + res.commit:<22} {res.n:>7,} {res.done:>9,} {res.seconds:>9.2f} "
            f"{1000 * res.seconds / per:>8.2f} {res.written / 1e6:>11.2f} {res.written / 1e3 / per:>9.2f} "
            f"{res.model_dir_bytes / 1e6:>12.2f} {res.ls_write_s:>9.2f}  {res.status}")


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True).stdout.strip()


def checkouts(specs: list[tuple[str, str]], work: Path) -> list[tuple[str, Path, str]]:
    """(name, root, commit label) of each --checkout NAME=PATH and --commit NAME=REV (extracted with
    `git archive` into the work folder; the repository itself is left untouched), in the order given.
    Each is byte-compiled first, so no import during a run writes a .pyc (that would count as written)."""
    out = []
    for kind, spec in specs:
        name, where = spec.split("=", 1)
        if kind == "path":
            root = Path(where).resolve()
            try:
                label = git(root, "describe", "--always", "--dirty", "--abbrev=7")
            except (subprocess.CalledProcessError, FileNotFoundError):
                label = "?"
        else:
            label = git(REPO, "rev-parse", "--short=7", where)
            root = work / f"checkout-{name}-{label}"
            root.mkdir()
            archive = subprocess.run(["git", "-C", str(REPO), "archive", label], capture_output=True,
                                     check=True).stdout
            subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
        subprocess.run([sys.executable, "-m", "compileall", "-q", "backend", "model", "_wsgi.py"], cwd=root,
                       check=True, stdout=subprocess.DEVNULL)
        out.append((name, root, label))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkout", dest="versions", action="append", type=lambda s: ("path", s), default=[],
                    metavar="NAME=PATH", help="a checkout of this repository (repeatable)")
    ap.add_argument("--commit", dest="versions", action="append", type=lambda s: ("rev", s),
                    metavar="NAME=REV", help="a commit of this repository, extracted with git archive (repeatable)")
    ap.add_argument("--tasks", type=int, nargs="+", default=[1000, 10000], help="N: tasks of the project")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--max-seconds", type=float, default=3600.0,
                    help="stop a run after this long (the row says how many tasks were done; extrapolated below)")
    ap.add_argument("--workdir", help="MODEL_DIRs and extracted commits (default: a temporary folder)")
    args = ap.parse_args(argv)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="ntt-bookkeeping-"))
    work.mkdir(parents=True, exist_ok=True)
    versions = checkouts(args.versions or [("path", f"this={REPO}")], work)
    print(f"machine: {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.2f} at start; "
          f"MODEL_DIRs under {work}", flush=True)
    results: list[Result] = []
    for _ in range(args.repeat):
        for n in args.tasks:
            for name, root, commit in versions:  # versions alternate for each N
                res = run_one(name, root, commit, n, args.max_seconds, work)
                results.append(res)
                print(row(res), flush=True)
    print(f"\n== START_TRAINING bookkeeping (empty bank: no model runs), embedded default, fake LS; "
          f"load average {os.getloadavg()[0]:.2f} at the end")
    print(HEADER)
    for res in results:
        print(row(res))
    for res in results:
        if res.done < res.n:
            print(f"{res.name} {res.commit} N={res.n:,}: {res.done:,} tasks done; {extrapolate(res)}")


if __name__ == "__main__":
    main()
