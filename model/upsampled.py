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

import io
import json
import threading
import zlib

import numpy as np

Crop = tuple[int, int, np.ndarray]  # (x0, y0, bool mask of the tight bounding box); empty: 0×0

_FORMAT = 1


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
        """Keys, origins and shapes as int32 arrays, the masks as one zlib-compressed bit stream."""
        with self._lock:
            items = sorted(self.crops.items())
            self.added = 0
        keys = np.array([k for k, _ in items], np.int32).reshape(-1, 3)
        origins = np.array([(x, y) for _, (x, y, _) in items], np.int32).reshape(-1, 2)
        shapes = np.array([m.shape for _, (_, _, m) in items], np.int32).reshape(-1, 2)
        bits = np.packbits(np.concatenate([m.ravel() for _, (_, _, m) in items])) if items else np.zeros(0, np.uint8)
        buf = io.BytesIO()
        np.savez(buf, keys=keys, origins=origins, shapes=shapes,
                 bits=np.frombuffer(zlib.compress(bits.tobytes(), 1), np.uint8),
                 header=np.frombuffer(json.dumps({"format": _FORMAT, "entry": self.entry_checksum}).encode(),
                                      np.uint8))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "UpsampledMasks":
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            header = json.loads(z["header"].tobytes().decode())
            if header.get("format") != _FORMAT:
                raise ValueError(f"unsupported upsampled-masks format {header.get('format')}")
            keys, origins, shapes = z["keys"], z["origins"], z["shapes"]
            sizes = shapes.astype(np.int64).prod(axis=1)
            flat = np.unpackbits(np.frombuffer(zlib.decompress(z["bits"].tobytes()), np.uint8),
                                 count=int(sizes.sum())).view(bool)
        if not (len(keys) == len(origins) == len(shapes)) or flat.size != int(sizes.sum()):
            raise ValueError("upsampled masks: arrays do not match")
        out = cls(header.get("entry"))
        starts = np.concatenate([[0], np.cumsum(sizes)])
        for k, (x, y), (h, w), s in zip(keys.tolist(), origins.tolist(), shapes.tolist(), starts.tolist()):
            mask = flat[s:s + h * w].reshape(h, w)
            mask.flags.writeable = False
            out.crops[tuple(k)] = (x, y, mask)
        return out
