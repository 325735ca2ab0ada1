"""On-disk cache of per-image proposals (SAM2 masks + DINOv2 descriptors), shared by workers.

Proposals do not depend on the memory bank, so an image that was proposed once is re-scored
against any later bank in milliseconds. Entries are Proposals.to_bytes() files (compressed,
thresholded masks exact) named by a key that covers the image content, the models, their weights and every
option that changes proposals. Beside an entry, a second file keeps the full-resolution masks that
matches upsampled from it (a model.upsampled.UpsampledMasks, the caller's mask cache: get_masks
reads it, put_masks stores it), tied to the proposals' checksum, so a later re-match reads them
instead of upsampling again. Writes are atomic (temp file + os.replace), so workers on a shared
folder never read half a file; a hit touches the files' mtime, and eviction removes the least
recently used files once the folder holds more than `max_bytes`.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from pathlib import Path

from model.atomic import TEMP_GLOB, atomic_write, touch
from model.options import MethodOptions
from model.types import Proposals
from model.upsampled import UpsampledMasks

log = logging.getLogger(__name__)

_SUFFIX = ".ntp"           # proposals
_UPSAMPLED = ".ntm"        # masks matches upsampled from them


def cache_key(image_sha256: str, engine_name: str, weights: str, options: MethodOptions) -> str:
    """Key of one image's proposals for one engine (models and their weights' fingerprint,
    Engine.fingerprint) and option set."""
    raw = f"{image_sha256}|{engine_name}|{weights}|{options.cache_key()}"
    return hashlib.sha256(raw.encode()).hexdigest()


class ProposalCache:
    """LRU-by-bytes folder of proposals; safe for several processes sharing the folder."""

    def __init__(self, directory: str | os.PathLike, max_bytes: int, low_water: float = 0.9) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = int(max_bytes)
        self.low_water = low_water
        self._lock = threading.Lock()
        self._total: int | None = None  # this process's estimate; re-measured before evicting

    def _path(self, key: str) -> Path:
        if not key or not all(c in "0123456789abcdef" for c in key):
            raise ValueError(f"bad proposal cache key {key!r}")
        return self.dir / key[:2] / (key + _SUFFIX)

    def get(self, key: str) -> Proposals | None:
        """Cached proposals, or None on a miss; an unreadable entry (corrupt, or an older format) is
        deleted and counts as a miss."""
        path = self._path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            proposals = Proposals.from_bytes(data)
        except Exception as exc:  # zip/npz/JSON/shape errors: the file is unusable either way
            log.warning("proposal cache: dropping unreadable entry %s (%s)", key, exc)
            path.unlink(missing_ok=True)
            return None
        for touched in (path, path.with_suffix(_UPSAMPLED)):
            try:
                touch(touched)  # LRU recency
            except FileNotFoundError:  # evicted by another worker meanwhile; we still have the data
                pass
        return proposals

    def get_masks(self, key: str, proposals: Proposals) -> UpsampledMasks:
        """The stored upsampled masks of these proposals (empty if absent, unreadable, or written
        for other proposals under the same key): the mask cache to pass to their matches."""
        owner = proposals.checksum()
        path = self._path(key).with_suffix(_UPSAMPLED)
        try:
            known = UpsampledMasks.from_bytes(path.read_bytes())
        except FileNotFoundError:
            return UpsampledMasks(owner)
        except Exception as exc:  # noqa: BLE001 - unusable either way: recomputed on demand
            log.warning("proposal cache: dropping unreadable upsampled masks %s (%s)", path.name, exc)
            path.unlink(missing_ok=True)
            return UpsampledMasks(owner)
        return known if known.owner == owner else UpsampledMasks(owner)

    def put_masks(self, key: str, masks: UpsampledMasks) -> int:
        """Store the mask cache of the entry `key`; returns the bytes written (0: the entry is gone).
        get_masks ignores it if the entry now holds other proposals."""
        path = self._path(key)
        if not path.is_file():
            return 0
        data = masks.to_bytes()
        atomic_write(path.with_suffix(_UPSAMPLED), data, fsync=False)
        touch(path.with_suffix(_UPSAMPLED))
        self._grew(len(data), keep=path)
        return len(data)

    def contains(self, key: str) -> bool:
        """Whether an entry exists (no read; it may still turn out unreadable)."""
        return self._path(key).is_file()

    def put(self, key: str, proposals: Proposals) -> int:
        """Store proposals atomically; returns the entry's size in bytes."""
        path = self._path(key)
        data = proposals.to_bytes()
        path.parent.mkdir(exist_ok=True)
        path.with_suffix(_UPSAMPLED).unlink(missing_ok=True)  # masks of an entry this one replaces
        atomic_write(path, data, fsync=False)
        touch(path)
        self._grew(len(data), keep=path)
        return len(data)

    def _grew(self, nbytes: int, keep: Path) -> None:
        with self._lock:
            if self._total is None:
                self._total = self._measure()[0]
            else:
                self._total += nbytes
            if self._total > self.max_bytes:
                self._evict(keep=keep)

    def _entries(self) -> list[tuple[int, int, Path]]:
        out = []
        for path in (*self.dir.glob(f"*/*{_SUFFIX}"), *self.dir.glob(f"*/*{_UPSAMPLED}")):
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            out.append((st.st_mtime_ns, st.st_size, path))
        return out

    def _measure(self) -> tuple[int, list[tuple[int, int, Path]]]:
        entries = self._entries()
        return sum(size for _, size, _ in entries), entries

    def _evict(self, keep: Path) -> None:
        """Delete least recently used entries (never `keep`) down to low_water * max_bytes."""
        total, entries = self._measure()  # other workers write here too: count for real
        target = int(self.max_bytes * self.low_water)
        removed = 0
        for _, size, path in sorted(entries):
            if total <= target:
                break
            if path.with_suffix(_SUFFIX) == keep:
                continue
            path.unlink(missing_ok=True)
            total -= size
            removed += 1
        self._total = total
        stale = time.time() - 3600
        for tmp in self.dir.glob(f"*/{TEMP_GLOB}"):  # left by a writer killed mid-put
            try:
                if tmp.stat().st_mtime < stale:
                    tmp.unlink()
            except FileNotFoundError:
                pass
        if removed:
            log.info("proposal cache: evicted %d entries, %d bytes left", removed, total)

    def total_bytes(self) -> int:
        """Bytes currently stored (a directory scan)."""
        return self._measure()[0]
