"""Fault-injection fixtures: private redis-server processes, a scriptable fake Label Studio, fast
fake job functions for web-layer tests, real worker subprocesses, and log checks.

Nothing here touches the shared Redis on 6379: every test that needs Redis starts its own
redis-server on a free loopback port, in its tmp_path, and stops it afterwards.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
import types
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import jwt
import numpy as np
import pytest
import redis
from werkzeug.serving import make_server

from backend import runtime
from backend import queueing
from backend.web.app import create_app
from backend.settings import Settings
from bench import fake_ls as bench_ls
from bench.fake_http import DROP, Reply, Request
from tests.backend.fixtures import CONFIG_XML, LEGACY_TOKEN  # noqa: F401 - the tests import them from here
from tests.helpers import ROOT, WorkerProcess, free_port, png_bytes, wait_for  # noqa: F401 - tests import ROOT here

LS_SIGNING_KEY = "fake-label-studio-signing-key-0123456789"
PAT = jwt.encode({"token_type": "refresh", "exp": 4102444800, "jti": "pat-7c1e"}, LS_SIGNING_KEY, algorithm="HS256")


# ------------------------------------------------------------------------------------------ helpers
def assert_no_secrets(text: str, *secrets: str) -> None:
    for secret in secrets:
        assert secret and secret not in text, f"a secret ({secret[:4]}…) appears in the output"


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

    def kill(self) -> None:
        """SIGKILL: Redis goes away at once; what it acknowledged is in its fsynced append-only file."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

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
class FakeLabelStudio(bench_ls.FakeLabelStudio):
    """bench/fake_ls.py's Label Studio holding project `pid`, scriptable for fault injection:

    * a personal access token `pat` is exchanged at POST /api/token/refresh/ for access JWTs
      (`Bearer`), accepted like the legacy `token` (None: no legacy token works);
    * `fail(method, path_regex, *outcomes)`: the next matching requests get these outcomes in
      order (an int = that HTTP status, with a body that echoes the Authorization header, as a
      careless proxy might, and so does a 401; (status, headers) = the same with these headers,
      e.g. Retry-After; "drop" = connection closed without an answer);
    * `hold(path_regex)`: matching requests wait until the returned Event is set (`arrived` tells
      that one came in), so a test can act while a worker is inside a job;
    * `redirect(path_regex, location)`: 302 to another host (presigned storage, or an attacker's hop);
    * every request is recorded as (method, path, Authorization header).
    """

    def __init__(self, pid: int = 1, token: str | None = LEGACY_TOKEN, label_config: str = CONFIG_XML,
                 host: str = "127.0.0.1", pat: str | None = None) -> None:
        super().__init__(token, host=host)
        self.pid = pid
        self.pat = pat
        self.access_tokens: list[str] = []  # access JWTs handed out for the PAT
        self.requests: list[tuple[str, str, str | None]] = []
        self.faults: list[list] = []
        self.holds: list[tuple[re.Pattern, threading.Event, threading.Event]] = []
        self.redirects: list[tuple[re.Pattern, str]] = []
        self.server = self.http.server  # the socketserver: `server_address` names the port
        self.add_project(pid, label_config)

    @property
    def label_config(self) -> str:
        """Project `pid`'s label config (a test may replace it)."""
        return self.projects[self.pid]

    @label_config.setter
    def label_config(self, value: str) -> None:
        with self.lock:
            self.projects[self.pid] = value

    # -------------------------------------------------------------- scripting
    def add_task(self, tid: int, seed: int | None = None, annotations=(), image: bytes | None = None,
                 url: str | None = None) -> dict:
        """Task `tid` showing `image` (default png_bytes(seed, else tid)) at /data/upload/<pid>/img<tid>.png;
        `url` replaces that address in the task."""
        task = super().add_task(self.pid, tid, f"img{tid}.png",
                                image if image is not None else png_bytes(tid if seed is None else seed), annotations)
        if url:
            task["data"]["image"] = url
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
        super().close()

    # -------------------------------------------------------------- serving
    def _fault(self, method: str, path: str):
        with self.lock:
            for fault in self.faults:
                if fault[0] == method and fault[1].search(path) and fault[2]:
                    return fault[2].pop(0)
        return None

    def dispatch(self, req: Request) -> Reply | object:
        """Redirects, holds and faults first, then the PAT exchange, then bench's auth and routes."""
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
        outcome, headers = self._fault(method, req.target), None
        if isinstance(outcome, tuple):
            outcome, headers = outcome
        if outcome == "drop":
            return DROP
        if isinstance(outcome, int):
            return Reply(outcome, {"detail": f"injected {outcome}", "seen_authorization": auth}, headers=headers)
        if method == "POST" and req.path == "/api/token/refresh/":
            return self._refresh(req)
        return super().dispatch(req)

    def authorized(self, auth: str | None) -> bool:
        if super().authorized(auth):
            return True
        with self.lock:
            return bool(auth and auth.startswith("Bearer ") and auth[7:] in self.access_tokens)

    def unauthorized(self, auth: str | None) -> Reply:
        return Reply(401, {"detail": "Authentication credentials were not provided.",
                           "seen_authorization": auth})

    def _refresh(self, req: Request) -> Reply:
        body = req.json() or {}
        if not self.pat or body.get("refresh") != self.pat:
            return Reply(401, {"detail": "Token is invalid or expired", "seen_refresh": body.get("refresh")})
        access = jwt.encode({"token_type": "access", "exp": int(time.time()) + 300,
                             "jti": os.urandom(8).hex()}, LS_SIGNING_KEY, algorithm="HS256")
        with self.lock:
            self.access_tokens.append(access)
        return Reply(200, {"access": access})


@pytest.fixture
def fake_ls():
    ls = FakeLabelStudio()
    yield ls
    ls.close()


# ------------------------------------------------------------------------------------------ fake jobs
class FakeJobs:
    """Stands in for the backend.jobs modules in web-layer tests: every job is fast and recorded."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.calls: list[tuple] = []
        self.lock = threading.Lock()
        self.modules = {}  # backend.jobs.<module> -> a module of fakes, as queueing imports them
        for module, name in (("predict", "predict_task"), ("webhook", "apply_webhook"), ("train", "train_project"),
                             ("bank", "rebuild_bank"), ("refresh", "refresh_project")):
            self.modules[f"backend.jobs.{module}"] = types.ModuleType(f"backend.jobs.{module}")
            setattr(self.modules[f"backend.jobs.{module}"], name, getattr(self, name))

    def _record(self, *call) -> None:
        with self.lock:
            self.calls.append(call)

    def predict_task(self, pid, task_id, image_url, config_hash, delivery_key=None, warm=False):
        self._record("predict_task", pid, task_id)
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
    for name, module in fake.modules.items():
        monkeypatch.setitem(sys.modules, name, module)
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
        replayer = app.extensions["ntt"].replayer
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
                                                     points_per_side=2, iou_threshold=0.0,
                                                     compile_decoder=False)))


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
