"""Full-resolution proposal masks already computed by a match, kept with the cached proposals.

Upsampling low-res logits to the image size (method doc §6.7) is the largest cost of re-matching
cached proposals. The result of one mask at one size never changes, and a bank change mostly asks
for the masks it asked for before, so each match records the crops it computed here and the next
match of the same proposals reads them instead of upsampling again. The proposal cache stores them
beside the proposals entry (backend.proposal_cache), tied to that entry's checksum so crops of
other proposals are never used. Crops are the tight (x0, y0, bool mask) boxes that
model.matching computes; stored as packed bits.
"""
from __future__ import annotations

import json
import threading
import zlib

import numpy as np

Crop = tuple[int, int, np.ndarray]  # (x0, y0, bool mask of the tight bounding box); empty: 0×0

_FORMAT = 2


class UpsampledMasks:
    """Crops by (proposal index, H, W); `added` counts those added since loading or saving."""

    def __init__(self, entry_checksum: int | None = None) -> None:
        self.entry_checksum = entry_checksum   # the proposals entry these crops belong to
        self.crops: dict[tuple[int, int, int], Crop] = {}
        self.added = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.crops)

    def get(self, index: int, size: tuple[int, int]) -> Crop | None:
        return self.crops.get((int(index), int(size[0]), int(size[1])))

    def add(self, index: int, size: tuple[int, int], crop: Crop) -> None:
        crop[2].flags.writeable = False  # shared by later matches: nobody may edit it
        with self._lock:
            key = (int(index), int(size[0]), int(size[1]))
            if key not in self.crops:
                self.crops[key] = crop
                self.added += 1

    def to_bytes(self) -> bytes:
        """A JSON header line, then keys [n, 3], origins [n, 2] and shapes [n, 2] as little-endian
        int32, then the masks as one zlib-compressed bit stream (cheap to read: no zip container)."""
        with self._lock:
            items = sorted(self.crops.items())
            self.added = 0
        table = np.array([(*k, x, y, *m.shape) for k, (x, y, m) in items], "<i4").reshape(-1, 7)
        bits = np.packbits(np.concatenate([m.ravel() for _, (_, _, m) in items])) if items else np.zeros(0, np.uint8)
        header = json.dumps({"format": _FORMAT, "entry": self.entry_checksum, "n": len(items)}).encode()
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
        out = cls(header.get("entry"))
        starts = np.concatenate([[0], np.cumsum(sizes)]).tolist()
        for (i, H, W, x, y, h, w), s in zip(table.tolist(), starts):
            mask = flat[s:s + h * w].reshape(h, w)
            mask.flags.writeable = False
            out.crops[(i, H, W)] = (x, y, mask)
        return out
