"""On-disk cache of per-image proposals (SAM2 masks + DINOv2 descriptors), shared by workers.

Proposals do not depend on the memory bank, so an image that was proposed once is re-scored
against any later bank in milliseconds. Entries are Proposals.to_bytes() files (compressed,
thresholded masks exact) named by a key that covers the image content, the models, their weights and every
option that changes proposals. Beside an entry, a second file keeps the full-resolution masks that
matches upsampled from it (a model.upsampled.UpsampledMasks, the caller's mask cache: get_masks
reads it, put_masks stores it), tied to the proposals' checksum, so a later re-match reads them
instead of upsampling again. The folder is a backend.storage.disk_lru.DiskLRU: atomic writes
(workers on a shared folder never read half a file), a hit marks both files used, and the least
recently used files go once the folder holds more than `max_bytes`.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from backend.storage.disk_lru import DiskLRU
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
        self.lru = DiskLRU(directory, max_bytes, patterns=(f"*/*{_SUFFIX}", f"*/*{_UPSAMPLED}"),
                           low_water=low_water)
        self.dir = self.lru.dir

    def _path(self, key: str) -> Path:
        if not key or not all(c in "0123456789abcdef" for c in key):
            raise ValueError(f"bad proposal cache key {key!r}")
        return self.dir / key[:2] / (key + _SUFFIX)

    def get(self, key: str) -> Proposals | None:
        """Cached proposals, or None on a miss; an unreadable entry (corrupt, or an older format) is
        deleted and counts as a miss."""
        path = self._path(key)
        data = self.lru.read(path)
        if data is None:
            return None
        try:
            proposals = Proposals.from_bytes(data)
        except Exception as exc:  # zip/npz/JSON/shape errors: the file is unusable either way
            log.warning("proposal cache: dropping unreadable entry %s (%s)", key, exc)
            path.unlink(missing_ok=True)
            return None
        self.lru.touch(path.with_suffix(_UPSAMPLED))  # its masks are as recent as the entry
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
        self.lru.write(path.with_suffix(_UPSAMPLED), data, keep=(path,))
        return len(data)

    def contains(self, key: str) -> bool:
        """Whether an entry exists (no read; it may still turn out unreadable)."""
        return self._path(key).is_file()

    def put(self, key: str, proposals: Proposals) -> int:
        """Store proposals atomically; returns the entry's size in bytes."""
        path = self._path(key)
        data = proposals.to_bytes()
        path.with_suffix(_UPSAMPLED).unlink(missing_ok=True)  # masks of an entry this one replaces
        self.lru.write(path, data)
        return len(data)

    def total_bytes(self) -> int:
        """Bytes currently stored (a directory scan)."""
        return self.lru.total_bytes()
