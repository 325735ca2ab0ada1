"""A mask cache: full-resolution proposal masks already upsampled, owned by the caller of a match.

Upsampling low-res logits to the image size (docs/method.md, "Matching", step 3) is the
largest cost of re-matching cached proposals. The result of one mask at one size never changes,
and a bank change mostly asks for the masks it asked for before. So a caller keeps an
`UpsampledMasks` per proposals object and passes it to the match (`masks=`), which reads it and
never changes it; the match returns the masks it had to compute as a new `UpsampledMasks`, and
the caller merges them in (`update`) and may store them (backend.storage.proposal_cache keeps them beside
the cached proposals). Each cache names the proposals it belongs to (`owner`, see
Proposals.checksum) and a match refuses a cache of other proposals. Crops are the tight
(x0, y0, read-only bool mask) boxes that model.mask_crops computes; stored as packed bits.
"""
from __future__ import annotations

import json
import threading
import zlib

import numpy as np

Crop = tuple[int, int, np.ndarray]  # (x0, y0, bool mask of the tight bounding box); empty: 0×0

_FORMAT = 3


class UpsampledMasks:
    """Crops by (proposal index, H, W) of the proposals whose checksum is `owner`.

    Thread-safe: several matches may read one cache while its owner merges new crops in.
    """

    def __init__(self, owner: str) -> None:
        self.owner = str(owner)
        self._crops: dict[tuple[int, int, int], Crop] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._crops)

    def keys(self) -> list[tuple[int, int, int]]:
        with self._lock:
            return sorted(self._crops)

    def get(self, index: int, size: tuple[int, int]) -> Crop | None:
        return self._crops.get((int(index), int(size[0]), int(size[1])))

    def add(self, index: int, size: tuple[int, int], crop: Crop) -> bool:
        """Record one crop (made read-only: later matches share it); False if it was known."""
        crop[2].flags.writeable = False
        key = (int(index), int(size[0]), int(size[1]))
        with self._lock:
            if key in self._crops:
                return False
            self._crops[key] = crop
            return True

    def update(self, other: "UpsampledMasks") -> int:
        """Merge the crops of another cache of the same proposals; returns how many were new."""
        if other.owner != self.owner:
            raise ValueError("upsampled masks of other proposals cannot be merged")
        with other._lock:
            items = list(other._crops.items())
        return sum(self.add(i, (H, W), crop) for (i, H, W), crop in items)

    def to_bytes(self) -> bytes:
        """A JSON header line, then keys [n, 3], origins [n, 2] and shapes [n, 2] as little-endian
        int32, then the masks as one zlib-compressed bit stream (cheap to read: no zip container)."""
        with self._lock:
            items = sorted(self._crops.items())
        table = np.array([(*k, x, y, *m.shape) for k, (x, y, m) in items], "<i4").reshape(-1, 7)
        bits = np.packbits(np.concatenate([m.ravel() for _, (_, _, m) in items])) if items else np.zeros(0, np.uint8)
        header = json.dumps({"format": _FORMAT, "owner": self.owner, "n": len(items)}).encode()
        return header + b"\n" + table.tobytes() + zlib.compress(bits.tobytes(), 1)

    @classmethod
    def from_bytes(cls, data: bytes) -> "UpsampledMasks":
        end = data.index(b"\n")
        header = json.loads(data[:end])
        if header.get("format") != _FORMAT:
            raise ValueError(f"unsupported upsampled-masks format {header.get('format')}")
        n = int(header["n"])
        table = np.frombuffer(data, "<i4", count=7 * n, offset=end + 1).reshape(n, 7).astype(np.int64)
        sizes = table[:, 5] * table[:, 6]
        flat = np.unpackbits(np.frombuffer(zlib.decompress(data[end + 1 + 28 * n:]), np.uint8),
                             count=int(sizes.sum())).view(bool)
        if flat.size != int(sizes.sum()):
            raise ValueError("upsampled masks: the bit stream does not match the table")
        out = cls(header["owner"])
        starts = np.concatenate([[0], np.cumsum(sizes)]).tolist()
        for (i, H, W, x, y, h, w), s in zip(table.tolist(), starts):
            mask = flat[s:s + h * w].reshape(h, w)
            mask.flags.writeable = False
            out._crops[(i, H, W)] = (x, y, mask)
        return out
