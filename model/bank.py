"""Memory bank: per-class reference descriptors, keyed so that one reference can change alone.

The reference code keeps a fixed [C, K, D] buffer; here every reference instance is stored as its
un-normalised mask-weighted mean descriptor r (docs/method.md, "References") under a unique `ref_id`, with an
optional `group` (e.g. the Label Studio annotation it came from). Prototypes are recomputed on
demand as p[c] = normalise(mean_k r[c, k]), so unequal shot counts per class
are normal and adding/removing a reference never touches the others.

Negatives (docs/method.md, "Negatives") are stored the same way in their own table: regions a
prediction labelled as a class that an annotator removed or relabelled, keyed by `neg_id`, with a
group (the annotation whose correction made them, so remove_group drops them with its references).
They are not references: `len`, `classes` and the prototypes ignore them.

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

_FORMAT = 1               # a bank without negatives is written exactly as before they existed
_FORMAT_NEGATIVES = 2     # with negatives: readers that would drop them refuse it instead
_HASH_HEADER = b"ntt-memory-bank/1\n"
_HASH_NEGATIVES = b"negatives\n"


@dataclass(frozen=True)
class Reference:
    """One stored reference instance (descriptor is a read-only float32 [D] array)."""

    ref_id: str
    class_name: str
    group: str | None
    descriptor: np.ndarray


def _hash_entries(h: "hashlib._Hash", entries: list[Reference]) -> None:
    for r in entries:
        meta = json.dumps([r.ref_id, r.class_name, r.group]).encode()
        h.update(len(meta).to_bytes(8, "little") + meta)
        h.update(r.descriptor.astype("<f4").tobytes())


def _entries_meta(entries: list[Reference]) -> list[dict]:
    return [{"ref_id": r.ref_id, "class": r.class_name, "group": r.group} for r in entries]


class MemoryBank:
    """Reference descriptors per class; see the module docstring."""

    def __init__(self, dim: int | None = None) -> None:
        if dim is not None and dim <= 0:
            raise ValueError(f"descriptor dimension must be positive, got {dim}")
        self._dim = dim
        self._refs: dict[str, Reference] = {}
        self._negatives: dict[str, Reference] = {}

    # ------------------------------------------------------------------ editing
    def add(self, class_name: str, ref_id: str, descriptor: np.ndarray | torch.Tensor | list,
            group: str | int | None = None) -> None:
        """Add a reference, or replace the one with the same ref_id (even if its class changes).

        `group` is stored as a string, so remove_group(5) also removes refs added with group "5".
        """
        self._refs[ref_id] = self._entry(class_name, ref_id, descriptor, group)

    def add_negative(self, class_name: str, neg_id: str, descriptor: np.ndarray | torch.Tensor | list,
                     group: str | int | None = None) -> None:
        """Add a negative of `class_name` (a region wrongly predicted as it), or replace the one
        with the same neg_id. Descriptors as for references (same model, same recipe)."""
        self._negatives[neg_id] = self._entry(class_name, neg_id, descriptor, group)

    def _entry(self, class_name: str, key: str, descriptor: np.ndarray | torch.Tensor | list,
               group: str | int | None) -> Reference:
        """A validated, read-only entry (a private float32 copy of the descriptor)."""
        if not isinstance(class_name, str) or not class_name:
            raise ValueError("class_name must be a non-empty string")
        if not isinstance(key, str) or not key:
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
            raise ValueError(f"descriptor of {key!r} has non-finite values")
        vec.setflags(write=False)
        return Reference(key, class_name, None if group is None else str(group), vec)

    def remove(self, ref_id: str) -> bool:
        """Remove one reference; False if it was not there."""
        return self._refs.pop(ref_id, None) is not None

    def remove_negative(self, neg_id: str) -> bool:
        """Remove one negative; False if it was not there."""
        return self._negatives.pop(neg_id, None) is not None

    def remove_group(self, group: str | int) -> int:
        """Remove every reference and negative of a group; returns how many were removed."""
        key = str(group)
        removed = 0
        for table in (self._refs, self._negatives):
            doomed = [r.ref_id for r in table.values() if r.group == key]
            for ref_id in doomed:
                del table[ref_id]
            removed += len(doomed)
        return removed

    # ------------------------------------------------------------------ reading
    def __len__(self) -> int:
        """Number of references (negatives alone match nothing)."""
        return len(self._refs)

    def __contains__(self, ref_id: object) -> bool:
        return ref_id in self._refs

    @property
    def dim(self) -> int | None:
        """Descriptor dimension: fixed at construction, else that of the stored entries."""
        if self._dim is not None:
            return self._dim
        first = next(iter(self._refs.values()), None) or next(iter(self._negatives.values()), None)
        return None if first is None else int(first.descriptor.shape[0])

    @property
    def classes(self) -> list[str]:
        return sorted({r.class_name for r in self._refs.values()})

    def refs(self, class_name: str) -> list[Reference]:
        """References of one class, sorted by ref_id ([] for an unknown class)."""
        return sorted((r for r in self._refs.values() if r.class_name == class_name),
                      key=lambda r: r.ref_id)

    def negatives(self, class_name: str | None = None) -> list[Reference]:
        """Negatives of one class (all if None), sorted by neg_id."""
        return sorted((r for r in self._negatives.values() if class_name is None or r.class_name == class_name),
                      key=lambda r: r.ref_id)

    def _sorted(self) -> list[Reference]:
        return [self._refs[k] for k in sorted(self._refs)]

    def unit_descriptors(self, names: list[str], negatives: bool = False,
                         device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(class index [M] into `names`, L2-normalised descriptors [M, D] float32) of the references
        (or the negatives) of those classes, for per-instance comparisons (docs/method.md, "Negatives")."""
        index = {name: c for c, name in enumerate(names)}
        entries = [r for r in (self.negatives() if negatives else self._sorted()) if r.class_name in index]
        vecs = (np.stack([r.descriptor for r in entries]).astype(np.float64) if entries
                else np.zeros((0, self.dim or 0)))
        vecs /= np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
        return (torch.tensor([index[r.class_name] for r in entries], dtype=torch.int64, device=device or "cpu"),
                torch.from_numpy(vecs.astype(np.float32)).to(device or "cpu"))

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
        """12-hex content hash: independent of insertion order, changes on any edit (negatives
        included; a bank without negatives keeps the hash it had before they existed)."""
        h = hashlib.sha256(_HASH_HEADER)
        _hash_entries(h, self._sorted())
        if self._negatives:
            h.update(_HASH_NEGATIVES)
            _hash_entries(h, self.negatives())
        return h.hexdigest()[:12]

    # ------------------------------------------------------------------ persistence
    def to_bytes(self) -> bytes:
        """npz with float32 descriptors [N, D] and JSON metadata; no pickle. Negatives, if any,
        follow as `negative_descriptors` and meta["negatives"] (format 2); without them the bytes
        are those of format 1."""
        refs, negs = self._sorted(), self.negatives()
        meta = {"format": _FORMAT_NEGATIVES if negs else _FORMAT, "dim": self.dim, "refs": _entries_meta(refs)}
        arrays = {"descriptors": self._stack(refs)}
        if negs:
            meta["negatives"] = _entries_meta(negs)
            arrays["negative_descriptors"] = self._stack(negs)
        buf = io.BytesIO()
        np.savez(buf, **arrays, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
        return buf.getvalue()

    def _stack(self, entries: list[Reference]) -> np.ndarray:
        return (np.stack([r.descriptor for r in entries]) if entries
                else np.zeros((0, self.dim or 0), np.float32)).astype("<f4")

    @classmethod
    def from_bytes(cls, data: bytes) -> "MemoryBank":
        """Inverse of to_bytes (both formats); ValueError with a clear message on anything malformed."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                meta = json.loads(z["meta"].tobytes().decode())
                if meta.get("format") not in (_FORMAT, _FORMAT_NEGATIVES):
                    raise ValueError(f"unsupported format {meta.get('format')!r}")
                tables = [("references", meta["refs"], np.asarray(z["descriptors"], dtype=np.float32))]
                if meta["format"] == _FORMAT_NEGATIVES:
                    tables.append(("negatives", meta["negatives"],
                                   np.asarray(z["negative_descriptors"], dtype=np.float32)))
            bank = cls(meta["dim"])
            for kind, entries, descriptors in tables:
                if descriptors.ndim != 2 or descriptors.shape[0] != len(entries):
                    raise ValueError(f"{len(entries)} {kind} but descriptors of shape {descriptors.shape}")
                if len({e["ref_id"] for e in entries}) != len(entries):
                    raise ValueError(f"duplicate ref_id among the {kind}")
                add = bank.add if kind == "references" else bank.add_negative
                for entry, vec in zip(entries, descriptors):
                    add(entry["class"], entry["ref_id"], vec, entry["group"])
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
