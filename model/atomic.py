"""Crash-safe file writes, shared by the bank file, the caches and the state files; LRU touches."""
from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path

TEMP_GLOB = ".*.tmp"  # names of atomic_write's temp files (left behind only by a killed writer)

_stamp_lock = threading.Lock()
_last_stamp_ns = 0


def atomic_write(path: str | os.PathLike, data: bytes | str, *, fsync: bool = True) -> None:
    """Write `data` to a temp file beside `path`, optionally fsync it, then os.replace: readers
    (other workers, a restart after a crash) see the old content or the new one, never a torn file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def touch(path: str | os.PathLike) -> None:
    """Mark `path` used now, for caches that evict the oldest mtime first. A plain os.utime(path)
    (and a write) stamps the kernel's coarse clock, one tick (1-10 ms) apart, so uses in a row
    would tie and leave the eviction order to chance; this stamps a nanosecond clock, strictly
    increasing within the process."""
    global _last_stamp_ns
    with _stamp_lock:
        _last_stamp_ns = stamp = max(time.time_ns(), _last_stamp_ns + 1)
    os.utime(path, ns=(stamp, stamp))
