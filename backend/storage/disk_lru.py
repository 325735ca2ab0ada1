"""A size-bounded folder of files, least recently used evicted first: the image and proposal caches.

Writes are atomic (temp file + os.replace, model.atomic), so processes sharing the folder never
read half a file. A read or write stamps the file's mtime with a strictly increasing nanosecond
clock (model.atomic.touch), which orders uses even within one tick of the kernel's file clock.
Each instance counts the bytes it wrote since it last scanned the folder; once that count passes
`max_bytes` it scans for real (other processes write there too) and deletes the oldest files down
to `low_water * max_bytes`, then sweeps temp files a killed writer left (an hour old or more).
So a folder with several writers may exceed the bound by what the others wrote since a scan; a
scan per write would bound it exactly but costs a stat of every file each time.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from model.atomic import TEMP_GLOB, atomic_write, touch

log = logging.getLogger(__name__)

STALE_TEMP_S = 3600  # a temp file this old is not being written any more


class DiskLRU:
    """The files matching `patterns` (globs relative to `directory`) of one cache folder."""

    def __init__(self, directory: str | os.PathLike, max_bytes: int, patterns: tuple[str, ...],
                 low_water: float = 1.0) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = int(max_bytes)
        self.patterns = patterns
        self.low_water = low_water
        self._lock = threading.Lock()
        self._total: int | None = None  # this instance's estimate; re-measured before evicting

    def read(self, path: Path) -> bytes | None:
        """The file's bytes (None when absent), marked used now."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        self.touch(path)
        return data

    @staticmethod
    def touch(path: Path) -> None:
        """Mark the file used now (nothing when another process evicted it meanwhile)."""
        try:
            touch(path)
        except FileNotFoundError:
            pass

    def write(self, path: Path, data: bytes, keep: Iterable[Path] = ()) -> None:
        """Store `data` at `path` atomically (no fsync: a cache), then evict if over the bound,
        never `path` itself nor the files in `keep`."""
        path.parent.mkdir(exist_ok=True)
        atomic_write(path, data, fsync=False)
        touch(path)
        with self._lock:
            self._total = self._measure()[0] if self._total is None else self._total + len(data)
            if self._total > self.max_bytes:
                self._evict({path, *keep})

    def total_bytes(self) -> int:
        """Bytes currently stored (a folder scan)."""
        return self._measure()[0]

    def _measure(self) -> tuple[int, list[tuple[int, int, Path]]]:
        entries = []
        for pattern in self.patterns:
            for path in self.dir.glob(pattern):
                try:
                    st = path.stat()
                except FileNotFoundError:
                    continue
                entries.append((st.st_mtime_ns, st.st_size, path))
        return sum(size for _, size, _ in entries), entries

    def _evict(self, keep: set[Path]) -> None:
        total, entries = self._measure()
        target = int(self.max_bytes * self.low_water)
        removed = 0
        for _, size, path in sorted(entries):
            if total <= target:
                break
            if path in keep:
                continue
            path.unlink(missing_ok=True)
            total -= size
            removed += 1
        self._total = total
        self._sweep_temp_files()
        if removed:
            log.info("cache %s: evicted %d files, %d bytes left", self.dir, removed, total)

    def _sweep_temp_files(self) -> None:
        stale = time.time() - STALE_TEMP_S
        folders = {str(Path(pattern).parent) for pattern in self.patterns}
        for folder in folders:
            for tmp in self.dir.glob(TEMP_GLOB if folder == "." else f"{folder}/{TEMP_GLOB}"):
                try:
                    if tmp.stat().st_mtime < stale:
                        tmp.unlink()
                except FileNotFoundError:
                    pass
