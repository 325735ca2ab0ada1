"""Run a real Label Studio 1.23.2 and our backend (gunicorn web + `python -m backend.queueing.worker`) as
subprocesses on 127.0.0.1, for the end-to-end tests.

Why the odd settings: Label Studio 1.23 refuses ML backends and webhooks on private/loopback
addresses unless ML_BLOCK_LOCAL_IP=false and SSRF_PROTECTION_ENABLED=false, rejects its own legacy
token unless legacy tokens are enabled when the organization is created, and silently binds
port+1 when a port is busy. A migrated data folder is cached once (~30 s cold start), then copied
for every instance (~3 s start).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import requests

from tests.backend.fixtures import LEGACY_TOKEN  # noqa: F401 - LS needs 5 < len <= 40; re-exported
from tests.helpers import free_port

REPO = Path(__file__).resolve().parents[2]
LS_VERSION = "1.23.2"
LS_USER = "ci@example.com"
LS_PASSWORD = "ci-password-123"
STRICT_VALIDATION_FLAG = "fflag_feat_utc_210_prediction_validation_15082025"
REDIS_HOST_PORT = "127.0.0.1:6379"

T = TypeVar("T")


# ---------------------------------------------------------------------------------------- helpers
def cache_root() -> Path:
    """Where venvs and the template data folder are cached (outside the checkout)."""
    return Path(os.environ.get("NTT_CACHE_DIR", Path.home() / ".cache" / "ntt-ls-backend"))


def listening_pids(port: int) -> set[int]:
    """PIDs listening on TCP `port` (from `ss`, which reads the kernel's socket table)."""
    out = subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True,
                         check=True).stdout
    return {int(p) for p in re.findall(r"pid=(\d+)", out)}


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.25,
             alive: Callable[[], None] | None = None) -> T:
    """Poll `predicate` until it returns a truthy value; `alive` raises if a process died."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if alive is not None:
            alive()
        try:
            value = predicate()
            if value:
                return value
        except (requests.RequestException, OSError) as exc:
            last_error = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}"
                       + (f" (last error: {last_error!r})" if last_error else ""))


def http_ok(url: str, auth: tuple[str, str] | None = None) -> bool:
    return requests.get(url, timeout=2, auth=auth).status_code == 200


# Polling noise left out of the log tails shown for a failed test.
_ROUTINE = re.compile(r'"GET [^"]*" 200 |GET /(health|jobs)\S* -> 200|POST /setup -> 200')


def tail(path: Path, lines: int = 120) -> str:
    """The last `lines` lines of a log, without successful polling requests."""
    try:
        kept = [ln for ln in path.read_text(errors="replace").splitlines() if not _ROUTINE.search(ln)]
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return "\n".join(kept[-lines:])


def _scrubbed_environ(drop_prefixes: Iterable[str], drop_names: Iterable[str]) -> dict[str, str]:
    prefixes, names = tuple(drop_prefixes), set(drop_names)
    return {k: v for k, v in os.environ.items() if k not in names and not k.startswith(prefixes)}


@dataclass
class ManagedProcess:
    """A child process with its output in a log file, stopped by PID."""

    name: str
    popen: subprocess.Popen
    log_path: Path

    @classmethod
    def spawn(cls, name: str, argv: list[str], env: Mapping[str, str], log_path: Path,
              cwd: Path = REPO) -> "ManagedProcess":
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(argv, cwd=cwd, env=dict(env), stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        return cls(name, popen, log_path)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def check_alive(self) -> None:
        code = self.popen.poll()
        if code is not None:
            raise RuntimeError(f"{self.name} (pid {self.pid}) exited with {code}; log {self.log_path}:\n"
                               f"{tail(self.log_path, 60)}")

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds."""
        if self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(grace)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(10)


# ---------------------------------------------------------------------------------- LS REST client
def _jwt_exp(token: str) -> float | None:
    """`exp` claim of a JWT (no signature check: we only need to know when to refresh)."""
    import base64

    try:
        payload = token.split(".")[1]
        return float(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["exp"])
    except (IndexError, ValueError, KeyError):
        return None


class LSClient:
    """Minimal Label Studio REST client: legacy `Token` auth, or a personal access token (a JWT
    refresh token) exchanged for short-lived `Bearer` access tokens."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.is_pat = _jwt_exp(token) is not None
        self._access: str | None = None
        self._access_exp = 0.0
        self.http = requests.Session()

    def auth_header(self) -> dict[str, str]:
        if not self.is_pat:
            return {"Authorization": f"Token {self.token}"}
        if self._access is None or time.time() > self._access_exp - 30:
            r = requests.post(f"{self.url}/api/token/refresh/", json={"refresh": self.token}, timeout=10)
            r.raise_for_status()
            self._access = r.json()["access"]
            self._access_exp = _jwt_exp(self._access) or time.time() + 60
        return {"Authorization": f"Bearer {self._access}"}

    def request(self, method: str, path: str, **kw: Any) -> requests.Response:
        headers = {**self.auth_header(), **kw.pop("headers", {})}
        return self.http.request(method, self.url + path, headers=headers, timeout=kw.pop("timeout", 120),
                                 **kw)

    def call(self, method: str, path: str, **kw: Any) -> Any:
        """Request and return the JSON body; any status >= 400 fails with the body in the message."""
        r = self.request(method, path, **kw)
        if r.status_code >= 400:
            raise AssertionError(f"{method} {path} -> {r.status_code}: {r.text[:1000]}")
        return r.json() if r.content else None

    def create_personal_access_token(self) -> str:
        return self.call("POST", "/api/token/")["token"]

    def set_token_settings(self, *, legacy: bool, personal: bool = True) -> None:
        """Organization-wide switch between legacy tokens and personal access tokens."""
        self.call("POST", "/api/jwt/settings",
                  json={"api_tokens_enabled": personal, "legacy_api_tokens_enabled": legacy})


# ------------------------------------------------------------------------------------ Label Studio
def label_studio_venv() -> Path:
    """The cached LS venv ($NTT_LS_VENV, else installed on first use by setup_label_studio.sh)."""
    if os.environ.get("NTT_LS_VENV"):
        return Path(os.environ["NTT_LS_VENV"])
    out = subprocess.run([str(REPO / "scripts" / "setup_label_studio.sh")], capture_output=True, text=True,
                         check=True).stdout
    return Path(out.strip().splitlines()[-1])


def ls_environment(data_dir: Path, files_root: Path, port: int) -> dict[str, str]:
    """Environment of a headless LS that can talk to a backend on 127.0.0.1 (see module doc).

    LS reads LABEL_STUDIO_X, then HEARTEX_X, then bare X: a runner's HOST/PORT/USERNAME would leak in."""
    env = _scrubbed_environ(("LABEL_STUDIO_", "HEARTEX_", "fflag_"),
                            ("HOST", "PORT", "USERNAME", "PASSWORD", "REDIS_URL", "DJANGO_DB"))
    env.update({
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
        "LABEL_STUDIO_USERNAME": LS_USER,
        "LABEL_STUDIO_PASSWORD": LS_PASSWORD,
        "LABEL_STUDIO_USER_TOKEN": LEGACY_TOKEN,
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(files_root),
        "LABEL_STUDIO_HOST": f"http://127.0.0.1:{port}",
        "ML_BLOCK_LOCAL_IP": "false",
        "SSRF_PROTECTION_ENABLED": "false",
        STRICT_VALIDATION_FLAG: "true",
        "LATEST_VERSION_CHECK": "false",
        "COLLECT_ANALYTICS": "false",
        "SENTRY_DSN": "",
        "FRONTEND_SENTRY_DSN": "",
        "PYTHONUNBUFFERED": "1",
    })
    return env


def _spawn_label_studio(venv: Path, data_dir: Path, files_root: Path, log_path: Path,
                        timeout: float) -> tuple[ManagedProcess, int]:
    port = free_port()
    env = ls_environment(data_dir, files_root, port)
    proc = ManagedProcess.spawn("label-studio", [str(venv / "bin" / "label-studio"), "start", "--no-browser",
                                                 "--internal-host", "127.0.0.1", "--port", str(port)],
                                env, log_path, cwd=data_dir.parent)
    try:
        wait_for(lambda: http_ok(f"http://127.0.0.1:{port}/health"), timeout, "Label Studio /health",
                 alive=proc.check_alive)
        # LS silently moves to port+1 when the port is taken: make sure we talk to our process.
        if proc.pid not in listening_pids(port):
            raise RuntimeError(f"port {port} is not owned by Label Studio pid {proc.pid} "
                               f"(owners: {listening_pids(port)})")
    except BaseException:
        proc.stop()
        raise
    return proc, port


def template_data_dir(venv: Path) -> Path:
    """A migrated LS data folder with the CI user and legacy token, built once and cached."""
    key = hashlib.sha256(f"{LS_VERSION}|{LS_USER}|{LS_PASSWORD}|{LEGACY_TOKEN}|legacy-on|{venv}".encode()
                         ).hexdigest()[:12]
    root = cache_root()
    final = root / f"ls-data-{LS_VERSION}-{key}"
    if (final / ".complete").exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "ls-template.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / ".complete").exists():
            return final
        build = Path(tempfile.mkdtemp(prefix="ls-template-", dir=root))
        try:
            data, files = build / "data", build / "files"
            data.mkdir()
            files.mkdir()
            proc, port = _spawn_label_studio(venv, data, files, build / "ls.log", timeout=600)
            try:
                LSClient(f"http://127.0.0.1:{port}", LEGACY_TOKEN).call("GET", "/api/current-user/whoami")
            finally:
                proc.stop()
            (data / ".complete").touch()
            shutil.rmtree(final, ignore_errors=True)
            os.replace(data, final)
        finally:
            shutil.rmtree(build, ignore_errors=True)
    return final


@dataclass
class LabelStudio:
    """One running Label Studio instance (own data folder, own local-files root)."""

    process: ManagedProcess
    url: str
    work_dir: Path
    files_root: Path

    @classmethod
    def start(cls, work_dir: Path, timeout: float = 120) -> "LabelStudio":
        venv = label_studio_venv()
        template = template_data_dir(venv)
        data, files = work_dir / "ls-data", work_dir / "files"
        shutil.copytree(template, data)
        files.mkdir(parents=True)
        proc, port = _spawn_label_studio(venv, data, files, work_dir / "logs" / "label-studio.log", timeout)
        return cls(proc, f"http://127.0.0.1:{port}", work_dir, files)

    def client(self, token: str = LEGACY_TOKEN) -> LSClient:
        return LSClient(self.url, token)

    def stop(self) -> None:
        self.process.stop()


# ------------------------------------------------------------------------------------ our backend
@dataclass
class Backend:
    """Our backend as deployed with Redis: one gunicorn web process and one RQ worker process; or,
    `embedded`, as the README's first command runs it: the gunicorn web process alone, no Redis."""

    url: str
    work_dir: Path                        # MODEL_DIR and logs
    web: ManagedProcess
    worker: ManagedProcess | None
    redis_url: str | None
    queue_prefix: str
    auth: tuple[str, str] | None = None   # (BASIC_AUTH_USER, BASIC_AUTH_PASS) the web process requires

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    @property
    def processes(self) -> list[ManagedProcess]:
        return [self.web] + ([self.worker] if self.worker else [])

    @classmethod
    def start(cls, work_dir: Path, ls_url: str, api_key: str, timeout: float = 180,
              basic_auth: tuple[str, str] | None = None, embedded: bool = False,
              port: int | None = None) -> "Backend":
        """`work_dir` holds MODEL_DIR and the logs: start again on it (and on the same `port`, which
        Label Studio knows) to restart the same deployment."""
        port = port or free_port()
        prefix = f"e2e-{uuid.uuid4().hex[:10]}"
        redis_url = None if embedded else f"redis://{REDIS_HOST_PORT}/{os.environ.get('NTT_E2E_REDIS_DB', '12')}"
        env = _scrubbed_environ(("LABEL_STUDIO_", "NTT_", "BASIC_AUTH_"),
                                ("REDIS_URL", "MODEL_DIR", "CACHE_DIR", "LOCAL_FILES_DOCUMENT_ROOT",
                                 "SCORE_THRESHOLD", "MAX_DETECTIONS", "ALLOWED_IMAGE_HOSTS"))
        env.update({
            "LABEL_STUDIO_URL": ls_url,
            "LABEL_STUDIO_API_KEY": api_key,
            "NTT_QUEUE_PREFIX": prefix,
            "MODEL_DIR": str(work_dir / "model-dir"),
            # small random-weight models: the pipeline is real, the numbers are meaningless
            "NTT_RANDOM_WEIGHTS": "1",
            "NTT_SAM_MODEL": "sam2.1-t",
            "NTT_DINO_MODEL": "dinov2-s",
            "NTT_SAM_IMAGE_SIZE": "256",
            "NTT_DINO_IMAGE_SIZE": "112",
            "NTT_POINTS_PER_SIDE": "4",
            "NTT_DEVICE": "cpu",
            "SCORE_THRESHOLD": "0",
            "LOG_LEVEL": "INFO",
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
        })
        if redis_url:
            env["REDIS_URL"] = redis_url
        if basic_auth:
            env.update({"BASIC_AUTH_USER": basic_auth[0], "BASIC_AUTH_PASS": basic_auth[1]})
        logs = work_dir / "logs"
        worker = None if embedded else ManagedProcess.spawn(
            "rq-worker", [sys.executable, "-m", "backend.queueing.worker"], env, logs / "backend-worker.log")
        gunicorn = ["gunicorn", "--bind", f"127.0.0.1:{port}", "--config", "python:backend.web.gunicorn_conf",
                    "--no-control-socket", "_wsgi:app"]  # the README's command
        web = ManagedProcess.spawn("web", [sys.executable, "-m", *gunicorn], env, logs / "backend-web.log")
        backend = cls(f"http://127.0.0.1:{port}", work_dir, web, worker, redis_url, prefix, basic_auth)
        try:
            wait_for(lambda: http_ok(f"{backend.url}/health", basic_auth), timeout, "backend /health",
                     alive=backend.check_alive)
            wait_for(backend.ready, timeout, "a worker (backend /health ready)", interval=0.5,
                     alive=backend.check_alive)
        except BaseException:
            backend.stop()
            raise
        return backend

    def check_alive(self) -> None:
        for proc in self.processes:
            proc.check_alive()

    def ready(self) -> bool:
        """The web process sees Redis and at least one worker on its queues (embedded: at once)."""
        return bool(requests.get(f"{self.url}/health", timeout=2, auth=self.auth).json().get("ready"))

    def metrics(self) -> dict:
        """The web process's counters (GET /metrics), e.g. "webhooks ANNOTATION_CREATED"."""
        r = requests.get(f"{self.url}/metrics", timeout=5, auth=self.auth)
        r.raise_for_status()
        return r.json()

    def jobs(self) -> list[dict]:
        """The recent jobs as the backend's GET /jobs reports them (status, meta, error)."""
        r = requests.get(f"{self.url}/jobs", params={"limit": 200}, timeout=5, auth=self.auth)
        r.raise_for_status()
        return r.json()["jobs"]

    def stop(self) -> None:
        for proc in self.processes:
            proc.stop()
        if self.redis_url:
            self.cleanup_redis()

    def cleanup_redis(self) -> None:
        """Drop this deployment's keys (store, queues, registries) and its jobs from the shared Redis."""
        import redis

        conn = redis.Redis.from_url(self.redis_url)
        try:
            keys = list(conn.scan_iter(match=f"*{self.queue_prefix}*"))
            job_ids: set[bytes] = set()
            for key in keys:
                kind = conn.type(key)
                if kind == b"list":
                    job_ids.update(conn.lrange(key, 0, -1))
                elif kind == b"zset":
                    job_ids.update(conn.zrange(key, 0, -1))
            jobs = [f"rq:{what}:{j.decode()}" for j in job_ids for what in ("job", "results")]
            if keys or jobs:
                conn.delete(*keys, *jobs)
            queues = [k for k in keys if k.startswith(b"rq:queue:")]
            if queues:
                conn.srem("rq:queues", *queues)
        finally:
            conn.close()
