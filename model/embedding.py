"""SAM2 image embeddings kept in memory, so that clicks on an image run only SAM2's prompt encoder
and mask decoder (docs/method.md, "Interactive segmentation").

The image encoder is most of a click's cost when the image is new (seconds on a CPU), the prompt
encoder + decoder a few milliseconds. An `EmbeddingCache` keeps the `SamImageState` of the images
seen last, bounded by count and by bytes (LRU); the proposal path fills it, so a click on an image
that was pre-annotated, or warmed when its task was opened, is fast from the first click.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import numpy as np

from model.proposals import SamImageState


def state_nbytes(state: SamImageState) -> int:
    """Bytes held by one image's SAM2 features (image embedding + high-res features)."""
    return sum(t.numel() * t.element_size() for t in (state.image_embed, *state.high_res_feats))


def image_key(image: np.ndarray) -> str:
    """Key of an image given as pixels, when the caller has no better one (e.g. its file's sha256):
    sha256 of its shape and bytes."""
    h = hashlib.sha256(repr((image.shape, image.dtype.str)).encode())
    h.update(np.ascontiguousarray(image).data)
    return h.hexdigest()


class EmbeddingCache:
    """Least-recently-used `SamImageState`s by key, at most `max_items` and `max_bytes` together.

    Thread-safe. An entry larger than `max_bytes` on its own is not kept. States are read-only
    (inference tensors): readers share them.
    """

    def __init__(self, max_items: int = 16, max_bytes: int = 512 * 2**20) -> None:
        if max_items < 0 or max_bytes < 0:
            raise ValueError("embedding cache bounds must be >= 0")
        self.max_items, self.max_bytes = int(max_items), int(max_bytes)
        self._entries: OrderedDict[str, tuple[SamImageState, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, key: str) -> SamImageState | None:
        """The state of `key` (now the most recently used), or None."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def put(self, key: str, state: SamImageState) -> None:
        """Keep `state` as the most recently used, evicting the least recently used past the bounds."""
        size = state_nbytes(state)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            if size > self.max_bytes or self.max_items == 0:
                return
            self._entries[key] = (state, size)
            self._bytes += size
            while len(self._entries) > self.max_items or self._bytes > self.max_bytes:
                _, (_, dropped) = self._entries.popitem(last=False)
                self._bytes -= dropped

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0
