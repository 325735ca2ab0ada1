"""Memory bank: per-class reference descriptors, keyed so that one reference can change alone.

The reference code keeps a fixed [C, K, D] buffer; here every reference instance is stored as its
un-normalised mask-weighted mean descriptor r (docs/method.md, "References") under a unique `ref_id`, with an
optional `group` (e.g. the Label Studio annotation it came from). Prototypes are recomputed on
demand as p[c] = normalise(mean_k r[c, k]), so unequal shot counts per class
are normal and adding/removing a reference never touches the others.

Not thread-safe: callers that share a bank between threads must hold their own lock.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model.atomic import atomic_write

_FORMAT = 1
_HASH_HEADER = b"ntt-memory-bank/1\n"


@dataclass(frozen=True)
class Reference:
    """One stored reference instance (descriptor is a read-only float32 [D] array)."""

    ref_id: str
    class_name: str
    group: str | None
    descriptor: np.ndarray


class MemoryBank:
    """Reference descriptors per class; see the module docstring."""

    def __init__(self, dim: int | None = None) -> None:
        if dim is not None and dim <= 0:
            raise ValueError(f"descriptor dimension must be positive, got {dim}")
        self._dim = dim
        self._refs: dict[str, Reference] = {}

    # ------------------------------------------------------------------ editing
    def add(self, class_name: str, ref_id: str, descriptor: np.ndarray | torch.Tensor | list,
            group: str | int | None = None) -> None:
        """Add a reference, or replace the one with the same ref_id (even if its class changes).

        `group` is stored as a string, so remove_group(5) also removes refs added with group "5".
        """
        if not isinstance(class_name, str) or not class_name:
            raise ValueError("class_name must be a non-empty string")
        if not isinstance(ref_id, str) or not ref_id:
            raise ValueError("ref_id must be a non-empty string")
        if isinstance(descriptor, torch.Tensor):
            descriptor = descriptor.detach().cpu().numpy()
        vec = np.array(descriptor, dtype=np.float32)  # always a private copy
        if vec.ndim != 1:
            raise ValueError(f"descriptor must be 1-D, got shape {vec.shape}")
        expected = self.dim
        if expected is not None and vec.shape[0] != expected:
            raise ValueError(f"descriptor has dimension {vec.shape[0]}, bank expects {expected}")
        if vec.shape[0] == 0:
            raise ValueError("descriptor is empty")
        if not np.isfinite(vec).all():
            raise ValueError(f"descriptor of {ref_id!r} has non-finite values")
        vec.setflags(write=False)
        self._refs[ref_id] = Reference(ref_id, class_name, None if group is None else str(group), vec)

    def remove(self, ref_id: str) -> bool:
        """Remove one reference; False if it was not there."""
        return self._refs.pop(ref_id, None) is not None

    def remove_group(self, group: str | int) -> int:
        """Remove every reference of a group; returns how many were removed."""
        key = str(group)
        doomed = [r.ref_id for r in self._refs.values() if r.group == key]
        for ref_id in doomed:
            del self._refs[ref_id]
        return len(doomed)

    # ------------------------------------------------------------------ reading
    def __len__(self) -> int:
        return len(self._refs)

    def __contains__(self, ref_id: object) -> bool:
        return ref_id in self._refs

    @property
    def dim(self) -> int | None:
        """Descriptor dimension: fixed at construction, else that of the stored references."""
        if self._dim is not None:
            return self._dim
        first = next(iter(self._refs.values()), None)
        return None if first is None else int(first.descriptor.shape[0])

    @property
    def classes(self) -> list[str]:
        return sorted({r.class_name for r in self._refs.values()})

    def refs(self, class_name: str) -> list[Reference]:
        """References of one class, sorted by ref_id ([] for an unknown class)."""
        return sorted((r for r in self._refs.values() if r.class_name == class_name),
                      key=lambda r: r.ref_id)

    def _sorted(self) -> list[Reference]:
        return [self._refs[k] for k in sorted(self._refs)]

    def prototypes(self, device: torch.device | str | None = None) -> tuple[list[str], torch.Tensor]:
        """(sorted class names, P[C, D] float32) with P[c] = normalise(mean of the class's refs).

        Sums run in float64 over refs sorted by ref_id, so P does not depend on insertion order.
        """
        names = self.classes
        dim = self.dim or 0
        protos = np.zeros((len(names), dim), dtype=np.float64)
        for c, name in enumerate(names):
            stack = np.stack([r.descriptor for r in self.refs(name)]).astype(np.float64)
            mean = stack.mean(axis=0)
            norm = np.linalg.norm(mean)
            protos[c] = mean / norm if norm > 0 else mean
        return names, torch.from_numpy(protos.astype(np.float32)).to(device or "cpu")

    @property
    def version(self) -> str:
        """12-hex content hash: independent of insertion order, changes on any edit."""
        h = hashlib.sha256(_HASH_HEADER)
        for r in self._sorted():
            meta = json.dumps([r.ref_id, r.class_name, r.group]).encode()
            h.update(len(meta).to_bytes(8, "little") + meta)
            h.update(r.descriptor.astype("<f4").tobytes())
        return h.hexdigest()[:12]

    # ------------------------------------------------------------------ persistence
    def to_bytes(self) -> bytes:
        """npz with float32 descriptors [N, D] and JSON metadata; no pickle."""
        refs = self._sorted()
        dim = self.dim or 0
        descriptors = (np.stack([r.descriptor for r in refs]) if refs
                       else np.zeros((0, dim), np.float32)).astype("<f4")
        meta = {"format": _FORMAT, "dim": self.dim,
                "refs": [{"ref_id": r.ref_id, "class": r.class_name, "group": r.group} for r in refs]}
        buf = io.BytesIO()
        np.savez(buf, descriptors=descriptors,
                 meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "MemoryBank":
        """Inverse of to_bytes; ValueError with a clear message on anything malformed."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                meta = json.loads(z["meta"].tobytes().decode())
                descriptors = np.asarray(z["descriptors"], dtype=np.float32)
            if meta.get("format") != _FORMAT:
                raise ValueError(f"unsupported format {meta.get('format')!r}")
            entries = meta["refs"]
            if descriptors.ndim != 2 or descriptors.shape[0] != len(entries):
                raise ValueError(f"{len(entries)} references but descriptors of shape {descriptors.shape}")
            if len({e["ref_id"] for e in entries}) != len(entries):
                raise ValueError("duplicate ref_id")
            bank = cls(meta["dim"])
            for entry, vec in zip(entries, descriptors):
                bank.add(entry["class"], entry["ref_id"], vec, entry["group"])
        except Exception as exc:  # zip, npz, JSON, key and shape errors all mean the same thing
            raise ValueError(f"corrupt memory bank data: {exc}") from exc
        return bank

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (see model.atomic)."""
        atomic_write(path, self.to_bytes())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "MemoryBank":
        try:
            return cls.from_bytes(Path(path).read_bytes())
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc
