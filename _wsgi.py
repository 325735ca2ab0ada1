"""WSGI entry point: `gunicorn --bind :9090 --config python:backend.web.gunicorn_conf _wsgi:app`."""
import logging

from backend import runtime
from backend.web.app import create_app

logging.basicConfig(level=runtime.get_settings().log_level,
                    format="%(asctime)s %(levelname)s %(name)s: %(message)s")

app = create_app()
