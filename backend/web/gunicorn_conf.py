"""gunicorn settings of the web process, so that its thread count and /predict's bound agree:

    gunicorn --bind 0.0.0.0:9090 --config python:backend.web.gunicorn_conf _wsgi:app

One process (it owns nothing heavy: models live in the workers), WEB_THREADS threads: backend.web.app
lets at most WEB_THREADS - 2 /predict calls wait for results, so /health and /setup always find a
free thread. A `--threads` on the command line that disagrees with WEB_THREADS is refused, and so
is `--preload`: without Redis the app opens the embedded queue's SQLite file, which must not be
opened before the worker process forks.
"""
from __future__ import annotations

from typing import Any

from backend.settings import Settings

workers = 1
worker_class = "gthread"
threads = Settings.from_env().web_threads
timeout = 0  # /predict holds its thread up to PREDICT_BUDGET_S by design: no worker timeout
preload_app = False


def on_starting(server: Any) -> None:
    """Refuse a thread count other than WEB_THREADS (/predict's bound is derived from it), and --preload."""
    if server.cfg.preload_app:
        raise SystemExit("gunicorn --preload is not supported: the app opens its embedded queue (SQLite) in "
                         "the process that serves it; nothing heavy is loaded at import, so it gains nothing")
    if server.cfg.threads != threads:
        raise SystemExit(f"gunicorn --threads {server.cfg.threads} differs from WEB_THREADS={threads}, "
                         "which /predict's bound on waiting calls is derived from: set WEB_THREADS instead")
