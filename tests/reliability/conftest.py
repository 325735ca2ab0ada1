"""Fault-injection fixtures: private redis-server processes, a scriptable fake Label Studio, fast
fake job functions for web-layer tests, real worker subprocesses, and log checks.

Nothing here touches the shared Redis on 6379: every test that needs Redis starts its own
redis-server on a free loopback port, in its tmp_path, and stops it afterwards.
"""
from __future__ import annotations

import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import jwt
import numpy as np
import pytest
import redis
from PIL import Image
from werkzeug.serving import make_server

from backend import queueing, runtime
from backend.app import create_app
from backend.settings import Settings
from bench.fake_http import DROP, Reply, Request, RouteServer
from tests.backend.fixtures import CONFIG_XML, LEGACY_TOKEN  # noqa: F401 - the tests import them from here

ROOT = Path(__file__).resolve().parents[2]
LS_SIGNING_KEY = "fake-label-studio-signing-key-0123456789"
PAT = jwt.encode({"token_type": "refresh", "exp": 4102444800, "jti": "pat-7c1e"}, LS_SIGNING_KEY, algorithm="HS256")


# ------------------------------------------------------------------------------------------ helpers
def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.05):
    """The first truthy value of predicate() within `timeout` s; AssertionError naming `what` otherwise."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def assert_no_secrets(text: str, *secrets: str) -> None:
    for secret in secrets:
        assert secret and secret not in text, f"a secret ({secret[:4]}…) appears in the output"


def png_bytes(seed: int = 0, size: tuple[int, int] = (80, 60)) -> bytes:
    """Noise with two flat blobs (something for the point grid to find)."""
    rng = np.random.default_rng(seed)
    w, h = size
    arr = (rng.random((h, w, 3)) * 60).astype(np.uint8)
    arr[h // 6:h * 7 // 12, w // 10:w // 2] = (200, 40, 40)
    arr[h // 2:h * 11 // 12, w * 9 // 16:w * 15 // 16] = (40, 40, 200)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def polygon_region(rid: str, label: str, points, size=(80, 60), from_name="poly") -> dict:
    return {"id": rid, "from_name": from_name, "to_name": "image", "type": "polygonlabels",
            "original_width": size[0], "original_height": size[1], "image_rotation": 0,
            "value": {"points": points, "closed": True, "polygonlabels": [label]}}


CAT = [[10, 16], [50, 16], [50, 58], [10, 58]]     # the red blob, in percent
DOG = [[56, 50], [94, 50], [94, 92], [56, 92]]     # the blue blob


# ------------------------------------------------------------------------------------------ Redis
class RedisServer:
    """A private redis-server on a free loopback port (append-only file, so a restart keeps data)."""

    def __init__(self, workdir: Path, password: str | None = None) -> None:
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.password = password
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_connect_timeout=1, socket_timeout=5)

    def start(self) -> "RedisServer":
        args = [shutil.which("redis-server") or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.dir), "--appendonly", "yes", "--appendfsync", "always", "--save", "",
                "--protected-mode", "no", "--logfile", str(self.dir / "redis.log")]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def up() -> bool:
            try:
                return bool(self.client().ping())
            except redis.exceptions.RedisError:
                assert self.proc.poll() is None, "redis-server exited at start"
                return False

        wait_for(up, 10, f"redis-server on port {self.port}")
        return self

    def stop(self) -> None:
        """Graceful stop (the append-only file is complete); the port is closed afterwards."""
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


@pytest.fixture
def private_redis(tmp_path):
    """private_redis(password=None) -> a started RedisServer; all are stopped after the test."""
    servers: list[RedisServer] = []

    def start(password: str | None = None) -> RedisServer:
        servers.append(RedisServer(tmp_path / f"redis{len(servers)}", password).start())
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


# ------------------------------------------------------------------------------------------ fake LS
class FakeLabelStudio:
    """A stateful stand-in for Label Studio's REST API and media routes on 127.0.0.1.

    * tasks / images / predictions as LS keeps them; legacy token auth (`Token <key>`);
    * `fail(method, path_regex, *outcomes)`: the next matching requests get these outcomes in
      order (an int = that HTTP status, with a body that echoes the Authorization header, as a
      careless proxy might; "drop" = connection closed without an answer);
    * `hold(path_regex)`: matching requests wait until the returned Event is set (`arrived` tells
      that one came in), so a test can act while a worker is inside a job;
    * `redirect(path_regex, location)`: 302 to another host (presigned storage, or an attacker's hop);
    * every request is recorded as (method, path, Authorization header).
    """

    def __init__(self, pid: int = 1, token: str | None = LEGACY_TOKEN, label_config: str = CONFIG_XML,
                 host: str = "127.0.0.1", pat: str | None = None) -> None:
        self.pid = pid
        self.token = token
        self.pat = pat                      # personal access token: exchanged at /api/token/refresh/
        self.access_tokens: list[str] = []  # access JWTs handed out for it
        self.label_config = label_config
        self.tasks: dict[int, dict] = {}
        self.images: dict[str, bytes] = {}
        self.predictions: dict[int, dict] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        self.faults: list[list] = []
        self.holds: list[tuple[re.Pattern, threading.Event, threading.Event]] = []
        self.redirects: list[tuple[re.Pattern, str]] = []
        self.lock = threading.Lock()
        self._next_prediction = 100
        self.http = RouteServer(self.dispatch, host=host)
        self.server = self.http.server  # the socketserver: `server_address` names the port
        self.url = self.http.url

    # -------------------------------------------------------------- scripting
    def add_task(self, tid: int, seed: int | None = None, annotations=(), image: bytes | None = None,
                 url: str | None = None) -> dict:
        name = f"img{tid}.png"
        self.images[name] = image if image is not None else png_bytes(tid if seed is None else seed)
        task = {"id": tid, "project": self.pid, "data": {"image": url or f"/data/upload/{self.pid}/{name}"},
                "annotations": list(annotations), "predictions": []}
        self.tasks[tid] = task
        return task

    def fail(self, method: str, path_regex: str, *outcomes) -> None:
        with self.lock:
            self.faults.append([method, re.compile(path_regex), list(outcomes)])

    def hold(self, path_regex: str) -> tuple[threading.Event, threading.Event]:
        """(release, arrived) for requests whose path matches."""
        release, arrived = threading.Event(), threading.Event()
        with self.lock:
            self.holds.append((re.compile(path_regex), release, arrived))
        return release, arrived

    def redirect(self, path_regex: str, location: str) -> None:
        """Answer matching requests with 302 Location: `location` (before any auth check)."""
        with self.lock:
            self.redirects.append((re.compile(path_regex), location))

    def release_all(self) -> None:
        for _, release, _ in self.holds:
            release.set()

    def hits(self, method: str, path_regex: str) -> list[tuple[str, str, str | None]]:
        with self.lock:
            return [r for r in self.requests if r[0] == method and re.search(path_regex, r[1])]

    def ours(self, tid: int) -> list[dict]:
        with self.lock:
            return [p for p in self.predictions.values() if p["task"] == tid]

    def close(self) -> None:
        self.release_all()
        self.http.close()

    # -------------------------------------------------------------- serving
    def _fault(self, method: str, path: str):
        with self.lock:
            for fault in self.faults:
                if fault[0] == method and fault[1].search(path) and fault[2]:
                    return fault[2].pop(0)
        return None

    def dispatch(self, req: Request) -> Reply | object:
        """The reply to one request (or DROP): redirects, holds and faults first, then auth and routes."""
        method, auth = req.method, req.headers.get("Authorization")
        with self.lock:
            self.requests.append((method, req.target, auth))
        for pattern, release, arrived in list(self.holds):
            if pattern.search(req.target):
                arrived.set()
                release.wait(120)
        for pattern, location in list(self.redirects):
            if pattern.search(req.target):
                return Reply(302, b"", None, {"Location": location})
        outcome = self._fault(method, req.target)
        if outcome == "drop":
            return DROP
        if isinstance(outcome, int):
            return Reply(outcome, {"detail": f"injected {outcome}", "seen_authorization": auth})
        path, query = req.path, req.query
        if method == "POST" and path == "/api/token/refresh/":
            return self._refresh(req)
        if not self._authorized(auth):
            return Reply(401, {"detail": "Authentication credentials were not provided.",
                               "seen_authorization": auth})
        with self.lock:
            return self._route(req, method, path, query)

    def _authorized(self, auth: str | None) -> bool:
        if self.token and auth == f"Token {self.token}":
            return True
        with self.lock:
            return bool(auth and auth.startswith("Bearer ") and auth[7:] in self.access_tokens)

    def _refresh(self, req: Request) -> Reply:
        body = req.json() or {}
        if not self.pat or body.get("refresh") != self.pat:
            return Reply(401, {"detail": "Token is invalid or expired", "seen_refresh": body.get("refresh")})
        access = jwt.encode({"token_type": "access", "exp": int(time.time()) + 300,
                             "jti": os.urandom(8).hex()}, LS_SIGNING_KEY, algorithm="HS256")
        with self.lock:
            self.access_tokens.append(access)
        return Reply(200, {"access": access})

    def _route(self, req: Request, method: str, path: str, query: dict) -> Reply:
        if method == "GET" and (m := re.fullmatch(r"/data/upload/\d+/(.+)", path)):
            if m.group(1) not in self.images:
                return Reply(404, {"detail": "Not found."})
            return Reply(200, self.images[m.group(1)], "image/png")
        if method == "GET" and path == f"/api/projects/{self.pid}/":
            return Reply(200, {"id": self.pid, "label_config": self.label_config})
        if method == "GET" and path == "/api/tasks/":
            page, size = int(query.get("page", ["1"])[0]), int(query.get("page_size", ["100"])[0])
            # as LS: a task lists its stored predictions (the caller holds self.lock)
            tasks = [{**self.tasks[t], "predictions": [p for p in self.predictions.values() if p["task"] == t]}
                     for t in sorted(self.tasks)]
            chunk = tasks[(page - 1) * size:page * size]
            if page > 1 and not chunk:
                return Reply(404, {"detail": "Invalid page."})
            return Reply(200, {"total": len(tasks), "tasks": chunk})
        if method == "GET" and (m := re.fullmatch(r"/api/tasks/(\d+)/", path)):
            task = self.tasks.get(int(m.group(1)))
            return Reply(200, task) if task else Reply(404, {"detail": "Not found."})
        if method == "GET" and path == "/api/predictions/":
            tid = int(query["task"][0])
            return Reply(200, [p for p in self.predictions.values() if p["task"] == tid])
        if method == "POST" and path == "/api/predictions/":
            pred = {**req.json(), "id": self._next_prediction}
            self._next_prediction += 1
            self.predictions[pred["id"]] = pred
            return Reply(201, pred)
        if method == "PATCH" and (m := re.fullmatch(r"/api/predictions/(\d+)/", path)):
            pred = self.predictions.get(int(m.group(1)))
            if pred is None:
                return Reply(404, {"detail": "Not found."})
            pred.update(req.json())
            return Reply(200, pred)
        return Reply(404, {"detail": f"no route {method} {path}"})


@pytest.fixture
def fake_ls():
    ls = FakeLabelStudio()
    yield ls
    ls.close()


# ------------------------------------------------------------------------------------------ fake jobs
class FakeJobs:
    """Stands in for backend.jobs in web-layer tests: every job is fast and recorded."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.calls: list[tuple] = []
        self.lock = threading.Lock()
        self.module = types.ModuleType("backend.jobs")
        for name in ("predict_task", "apply_webhook", "train_project", "rebuild_bank", "refresh_project"):
            setattr(self.module, name, getattr(self, name))

    def _record(self, *call) -> None:
        with self.lock:
            self.calls.append(call)

    def predict_task(self, pid, task, label_config, delivery_key=None):
        self._record("predict_task", pid, task["id"])
        if self.delay_s:
            time.sleep(self.delay_s)
        if delivery_key is not None and runtime.get_store().claim(delivery_key, "web") == "api":
            return {"delivered": "api"}
        return {"result": [], "score": 0.0, "model_version": runtime.model_version(pid)}

    def apply_webhook(self, pid, event, payload):
        self._record("apply_webhook", pid, event, payload.get("annotation", {}).get("id")
                     if isinstance(payload.get("annotation"), dict) else None)
        return {"event": event}

    def train_project(self, pid):
        self._record("train_project", pid)
        return {"tasks": 0}

    def rebuild_bank(self, pid, refresh=True):
        self._record("rebuild_bank", pid)
        return {}

    def refresh_project(self, pid):
        self._record("refresh_project", pid)
        return {}


@pytest.fixture
def fake_jobs(monkeypatch):
    fake = FakeJobs()
    monkeypatch.setitem(sys.modules, "backend.jobs", fake.module)
    return fake


def mark_bank_filled(pid: int, version: str = "0123456789abcdef") -> None:
    """Pretend the project has references (only the version key: the web never loads the bank)."""
    runtime.get_store().set(f"bank:{pid}:version", version)


def fill_bank(pid: int, dim: int = 384) -> str:
    """Give the project one real reference (DINOv2-S sized), so the real jobs fetch and predict."""
    return runtime.get_bank_store().update(pid, lambda bank: bank.add("Cat", "0:seed", np.ones(dim, np.float32)))


@pytest.fixture
def make_app(tmp_path):
    """make_app(**settings overrides) -> Flask app on a fresh runtime (MODEL_DIR in tmp_path)."""
    apps = []

    def make(**overrides):
        runtime.reset()
        base = replace(Settings.from_env(), model_dir=tmp_path / "model", cache_dir=tmp_path / "cache")
        apps.append(create_app(replace(base, **overrides)))
        return apps[-1]

    yield make
    for app in apps:
        replayer = app.extensions["ntt"]["replayer"]
        if replayer is not None:
            replayer.stop()
    runtime.reset()


@contextmanager
def serving(app):
    """`app` on a real threaded HTTP server on 127.0.0.1 (werkzeug); yields its base URL."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


# ------------------------------------------------------------------------------------------ engine
@pytest.fixture(scope="session")
def engine():
    """The small random-weight engine of tests/conftest.py, built once per session."""
    import torch

    from model.engine import Engine, EngineConfig
    from model.options import MethodOptions

    torch.set_num_threads(1)
    torch.manual_seed(0)
    return Engine(EngineConfig(sam_model="sam2.1-t", dino_model="dinov2-s", random_weights=True, device="cpu",
                               options=MethodOptions(sam_image_size=256, dino_image_size=112,
                                                     points_per_side=2, iou_threshold=0.0)))


@pytest.fixture
def embedded(tmp_path, engine, fake_ls):
    """Embedded mode (no Redis) with the real jobs and engine, wired to the fake LS.

    embedded(**settings overrides) -> Flask test client. Jobs run on the in-process worker thread.
    """
    def make(**overrides):
        runtime.reset()
        values = {"model_dir": tmp_path / "model", "cache_dir": tmp_path / "cache", "label_studio_url": fake_ls.url,
                  "label_studio_api_key": LEGACY_TOKEN, "score_threshold": 0.0, "predict_budget_s": 30.0}
        settings = replace(Settings.from_env(), **{**values, **overrides})
        app = create_app(settings)
        runtime.configure(engine=engine)
        return app.test_client()

    yield make
    runtime.reset()


def wait_job(job_id: str, timeout: float = 60.0) -> queueing.JobInfo:
    return wait_for(lambda: (i := queueing.fetch(job_id)) is not None and i.done and i, timeout, f"job {job_id}")


# ------------------------------------------------------------------------------------------ workers
class WorkerProcess:
    """The backend worker in its own process group (a SIGKILL takes its scheduler too, like a
    container being killed); output goes to a file. Random-weight models come from a fixed seed,
    so every worker process computes the same descriptors, as workers with real checkpoints do."""

    def __init__(self, env: dict, log_path: Path, *args: str) -> None:
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "backend.worker", *args], cwd=ROOT, env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 120) -> None:
        def ready() -> bool:
            assert self.proc.poll() is None, f"worker exited early:\n{self.output()[-3000:]}"
            return "serving queues" in self.output()
        wait_for(ready, timeout, "the worker to load its models", interval=0.2)

    def kill(self) -> None:
        """SIGKILL the whole process group: no cleanup of any kind runs."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # a scheduler child left behind
        except (ProcessLookupError, PermissionError):
            pass
        self._log.close()


@pytest.fixture
def workers():
    """workers(env, log_path, *args) -> a WorkerProcess whose models are loaded; all
    are stopped after the test, and `workers.logs()` is everything they printed."""
    started: list[WorkerProcess] = []

    def start(env: dict, log_path: Path, *args: str) -> WorkerProcess:
        started.append(WorkerProcess(env, log_path, *args))
        started[-1].wait_ready()
        return started[-1]

    start.logs = lambda: "".join(w.output() for w in started)
    yield start
    for w in started:
        w.stop()
