"""What both queue backends share: the queue names and policies, JobInfo (a job as the web sees
it), and the JSON checks that keep anything but JSON data off the queue (see backend/queueing/__init__.py)."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from rq.serializers import JSONSerializer

QUEUES = ("interactive", "bank", "predict", "evaluate")  # in priority order (clicks first; evaluations never before a waiting prediction)
RETRY_BACKOFF_S = (5, 30, 120)            # delay before retry 1, 2, 3 (the last repeats)
RESULT_TTL_S = 24 * 3600                  # finished jobs stay readable by /predict and /jobs
FAILURE_TTL_S = 7 * 24 * 3600
HEALTH_TIMEOUT_S = 0.2
HEALTH_MAX_AGE_S = 2.0                    # /health reads a snapshot the spool thread refreshes each second
EMBEDDED_HISTORY = 1000                   # jobs remembered by the embedded worker
TERMINAL = frozenset({"finished", "failed", "stopped", "canceled"})
ACTIVE = frozenset({"queued", "scheduled", "started", "deferred"})  # an enqueue of such an id is a no-op
SERIALIZER = JSONSerializer               # for every RQ Queue, Job and Worker: never pickle
UNREADABLE = "job data in Redis is not JSON: refused (was it written by an older version or planted?)"


class QueueUnavailable(RuntimeError):
    """The queue backend (Redis) cannot take the job now."""


@dataclass
class JobInfo:
    """What the web needs to know about a job, in either mode."""

    id: str
    func: str
    status: str                     # queued, started, scheduled, deferred, finished, failed, stopped, canceled
    meta: dict = field(default_factory=dict)
    result: Any = None
    error: str | None = None        # last line of the exception (no traceback)
    enqueued_at: datetime | None = None
    ended_at: datetime | None = None

    @property
    def done(self) -> bool:
        return self.status in TERMINAL

    def to_dict(self, with_result: bool = False) -> dict:
        out = {"id": self.id, "func": self.func, "status": self.status, "meta": self.meta,
               "error": self.error,
               "enqueued_at": self.enqueued_at.isoformat() if self.enqueued_at else None,
               "ended_at": self.ended_at.isoformat() if self.ended_at else None}
        if with_result:
            out["result"] = self.result
        return out


def error_line(exc_string: str | None) -> str | None:
    """'ImageError: bad thing' from a formatted traceback (tracebacks stay in the worker log)."""
    if not exc_string:
        return None
    lines = [ln for ln in exc_string.strip().splitlines() if ln.strip()]
    if not lines:
        return None
    line = re.sub(r"^[\w.]+\.(\w+):", r"\1:", lines[-1].strip())  # backend.errors.ImageError -> ImageError
    return line[:500]


def json_data(value: Any, what: str) -> Any:
    """The JSON copy of `value` (tuples become lists); TypeError naming `what` when it is not JSON data."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{what} must be JSON data (ids, URLs, hashes, lists and dicts of those): {exc}") from None


def retry_intervals(retries: int) -> list[int]:
    """The backoff before each of `retries` retries (RETRY_BACKOFF_S, its last value repeated)."""
    return [RETRY_BACKOFF_S[min(i, len(RETRY_BACKOFF_S) - 1)] for i in range(max(0, retries))]


def retry_delay(intervals: list[int], retries_left: int) -> int:
    """The wait before the next retry, chosen as RQ's Job.get_retry_interval does."""
    return intervals[max(len(intervals) - retries_left, 0)] if intervals else 0
