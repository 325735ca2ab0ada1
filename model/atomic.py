"""Crash-safe file writes, shared by the bank file, the caches and the state files."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

TEMP_GLOB = ".*.tmp"  # names of atomic_write's temp files (left behind only by a killed writer)


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
