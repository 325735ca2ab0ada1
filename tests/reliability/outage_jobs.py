"""A cheap job for the worker-outage test, run by a real `python -m backend.queueing.worker` by import path."""
from __future__ import annotations

import os

from backend import queueing


def apply(path: str, event: str) -> str:
    """Append `event` to the file at `path` (idempotent for the test: it reads a set), reporting
    progress through Redis on the way as the real jobs do."""
    for step in range(3):
        queueing.update_meta(step=step)
    with open(path, "a", encoding="utf-8") as f:
        f.write(event + "\n")
        f.flush()
        os.fsync(f.fileno())
    return event
