"""Process-local counters for GET /metrics."""
from __future__ import annotations

import threading
from collections import Counter


class Metrics:
    """Thread-safe named counters (the web serves requests on several threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def inc(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)
