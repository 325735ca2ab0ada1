"""Data types passed between the method's stages.

`Proposals` is the class-agnostic output of SAM2 + DINOv2 for one target image. It does not depend
on the memory bank, so it is cached per image and re-scored whenever the bank changes.
`Detections` is the final, per-image result of matching.
"""
from __future__ import annotations

import hashlib
import io
import json
import zlib
from dataclasses import dataclass

import numpy as np
import torch

_FORMAT = 3


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """[N, h, w] bool masks -> [N, 4] int64 xyxy boxes with inclusive max indices; [0, 0, 0, 0]
    for an empty mask (the box convention of SAM's batched_mask_to_box, which the method uses)."""
    n, h, w = masks.shape
    rows, cols = masks.any(dim=2), masks.any(dim=1)                 # [N, h], [N, w]
    out = torch.zeros(n, 4, dtype=torch.int64, device=masks.device)
    for lo, hi, hits, size in ((0, 2, cols, w), (1, 3, rows, h)):
        coords = torch.arange(size, device=masks.device)[None, :]
        out[:, lo] = torch.where(hits, coords, size).amin(dim=1)
        out[:, hi] = torch.where(hits, coords, -1).amax(dim=1)
    return out * masks.flatten(1).any(dim=1, keepdim=True)


def _window_any_all(x: torch.Tensor, radius: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """OR and AND of a boolean tensor over a (2r+1) window along `dim` (out-of-range ignored)."""
    any_, all_ = x.clone(), x.clone()
    n = x.shape[dim]
    for k in range(1, radius + 1):
        if k >= n:
            break
        lo, hi = x.narrow(dim, 0, n - k), x.narrow(dim, k, n - k)
        any_.narrow(dim, k, n - k).logical_or_(lo)
        any_.narrow(dim, 0, n - k).logical_or_(hi)
        all_.narrow(dim, k, n - k).logical_and_(lo)
        all_.narrow(dim, 0, n - k).logical_and_(hi)
    return any_, all_


def _sign_boundary(signs: torch.Tensor, radius: int) -> torch.Tensor:
    """Pixels whose (2r+1)² neighbourhood holds both signs: the only ones whose exact logit value
    can change the sign of a bilinear upsample (see Proposals.to_bytes). Separable boolean
    window max/min (much cheaper than max-pooling floats)."""
    row_any, row_all = _window_any_all(signs, radius, -1)
    any_, _ = _window_any_all(row_any, radius, -2)
    _, all_ = _window_any_all(row_all, radius, -2)
    return any_ & ~all_


class _PackedLogits:
    """Low-res logits as stored in the cache: sign bits plus the exact values of the pixels whose
    neighbourhood holds both signs, kept per mask so that only the masks a match needs are decoded.

    signs: [N, h, w] bool; values: float32, the boundary values of mask 0, then mask 1, ...;
    offsets: [N + 1] start of each mask's values; radius: the boundary neighbourhood radius.
    """

    def __init__(self, signs: torch.Tensor, values: torch.Tensor, offsets: np.ndarray, radius: int,
                 boxes: torch.Tensor) -> None:
        self.signs, self.values, self.offsets, self.radius = signs, values, offsets, int(radius)
        self.boxes = boxes

    def take(self, index: torch.Tensor | None = None) -> torch.Tensor:
        """Float logits of the masks at `index` (all if None), thresholded-exact (see to_bytes)."""
        if index is None:
            signs, rows = self.signs, None
        else:
            signs, rows = self.signs[index], index.cpu().numpy().reshape(-1)
        logits = torch.where(signs, 1.0, -1.0)
        if signs.shape[0]:
            # the boundary of a mask depends on that mask alone: computing it for a subset is exact
            boundary = _sign_boundary(signs, self.radius)
            values = self.values if index is None else torch.cat(
                [self.values[self.offsets[r]:self.offsets[r + 1]] for r in rows])
            logits[boundary] = values.to(logits.device)
        return logits

    def to(self, device: torch.device | str) -> "_PackedLogits":
        return _PackedLogits(self.signs.to(device), self.values, self.offsets, self.radius,
                             self.boxes.to(device))


class Proposals:
    """Class-agnostic mask proposals of one image.

    logits: [N, h, w] float32 low-res SAM2 mask logits (h = w = sam_image_size // 4) of the kept
            prompts (best of 3 multimask outputs, predicted IoU > threshold, non-empty mask).
            Proposals read from the cache keep them packed and decode a mask only when it is
            needed (`logits_of`); the `logits` property decodes all of them.
    iou: [N] predicted IoU of each kept prompt.
    descriptors: [N, D] float32, L2-normalised mask-pooled DINOv2 features.
    image_size: (H, W) of the original (EXIF-transposed) image.
    Never modified after construction: a match reads them (full-resolution masks it upsamples
    live in a caller-owned model.upsampled.UpsampledMasks, not here).
    """

    def __init__(self, logits: torch.Tensor | None, iou: torch.Tensor, descriptors: torch.Tensor,
                 image_size: tuple[int, int], meta: dict | None = None, *,
                 packed: _PackedLogits | None = None) -> None:
        if (logits is None) == (packed is None):
            raise ValueError("Proposals need either dense logits or packed ones")
        self._logits, self._packed = logits, packed
        self.iou, self.descriptors = iou, descriptors
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.meta = dict(meta or {})

    def __len__(self) -> int:
        return int(self.iou.shape[0])

    def __repr__(self) -> str:
        return f"Proposals(n={len(self)}, lowres={self.lowres_shape}, image_size={self.image_size})"

    @property
    def logits(self) -> torch.Tensor:
        """[N, h, w] float logits (packed ones are decoded on each access, nothing is kept)."""
        return self._packed.take() if self._logits is None else self._logits

    @property
    def lowres_shape(self) -> tuple[int, int]:
        ref = self._logits if self._logits is not None else self._packed.signs
        return int(ref.shape[-2]), int(ref.shape[-1])

    def lowres_boxes(self) -> torch.Tensor:
        """[N, 4] inclusive xyxy boxes of the low-res masks (stored in the cache: no pass over them)."""
        return self._packed.boxes if self._packed is not None else mask_boxes(self._logits > 0)

    def logits_of(self, index: torch.Tensor) -> torch.Tensor:
        """[n, h, w] float logits of the proposals at `index`, decoding only those."""
        return self._packed.take(index) if self._logits is None else self._logits[index]

    def lowres_masks(self, index: torch.Tensor) -> torch.Tensor:
        """[n, h, w] bool low-res masks (logit > 0) at `index`; packed ones need no decoding."""
        return self._packed.signs[index] if self._logits is None else self._logits[index] > 0

    def to(self, device: torch.device | str) -> "Proposals":
        if self._logits is None:
            return Proposals(None, self.iou.to(device), self.descriptors.to(device), self.image_size,
                             self.meta, packed=self._packed.to(device))
        return Proposals(self._logits.to(device), self.iou.to(device), self.descriptors.to(device),
                         self.image_size, self.meta)

    def checksum(self) -> str:
        """Identity of these proposals for the masks upsampled from them (UpsampledMasks.owner):
        a hash of the predicted IoUs, descriptors, low-res mask boxes and sizes, the same for `to`
        copies and for a cache round trip (to_bytes keeps all of them exactly)."""
        h = hashlib.sha256()
        h.update(json.dumps([list(self.image_size), list(self.lowres_shape), len(self)]).encode())
        for t in (self.iou.float(), self.descriptors.float(), self.lowres_boxes().long()):
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:32]

    # ------------------------------------------------------------------ compact serialisation
    def upsample_radius(self) -> int:
        """Low-res neighbourhood radius that a bilinear (antialiased) resize to image_size reads."""
        h = self.lowres_shape[-1]
        H, W = self.image_size
        scale = min(H, W) / max(h, 1)
        return 1 if scale >= 1 else int(np.ceil(1.0 / scale)) + 1

    def to_bytes(self) -> bytes:
        """Compact, exact-where-it-matters encoding.

        Masks are stored as their sign bits plus the float32 logits of the pixels whose neighbourhood
        holds both signs. Bilinear upsampling is a non-negative weighted mean of a small
        neighbourhood, so a uniform-sign neighbourhood yields that sign whatever the values, and a
        mixed one is reproduced bit-exactly: thresholded full-resolution masks are identical to
        those from the original logits. The per-mask count of boundary values lets a reader decode
        single masks. Descriptors and IoU are kept in float32.
        """
        logits = self.logits.detach().float().cpu()
        signs = logits > 0
        r = self.upsample_radius()
        boundary = _sign_boundary(signs, r) if len(self) else signs
        buf = io.BytesIO()
        np.savez(  # float arrays are incompressible; the sign bits are zlib-compressed by hand
            buf,
            signs=np.frombuffer(zlib.compress(np.packbits(signs.numpy(), axis=-1).tobytes(), 1), np.uint8),
            boundary_values=logits[boundary].numpy().astype(np.float32),
            boundary_counts=boundary.flatten(1).sum(1).numpy().astype(np.int64),
            boxes=mask_boxes(signs).numpy().astype(np.int32),
            iou=self.iou.detach().float().cpu().numpy(),
            descriptors=self.descriptors.detach().float().cpu().numpy(),
            header=np.frombuffer(json.dumps({
                "format": _FORMAT, "shape": list(logits.shape), "radius": r,
                "image_size": list(self.image_size), "meta": self.meta}).encode(), dtype=np.uint8),
        )
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, device: torch.device | str | None = None) -> "Proposals":
        """Decode to_bytes output onto `device`; masks stay packed until used (see logits_of)."""
        device = torch.device(device or "cpu")
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            header = json.loads(z["header"].tobytes().decode())
            if header.get("format") != _FORMAT:
                raise ValueError(f"unsupported proposals format {header.get('format')}")
            shape = tuple(header["shape"])
            packed = np.frombuffer(zlib.decompress(z["signs"].tobytes()), np.uint8)
            packed = packed.reshape(*shape[:-1], (shape[-1] + 7) // 8)
            signs = torch.from_numpy(np.unpackbits(packed, axis=-1, count=shape[-1]).view(bool))
            counts = z["boundary_counts"].astype(np.int64)
            values = torch.from_numpy(z["boundary_values"])
            if counts.shape != (shape[0],) or int(counts.sum()) != values.shape[0]:
                raise ValueError("proposals boundary counts do not match the stored values")
            offsets = np.concatenate([[0], np.cumsum(counts)])
            boxes = torch.from_numpy(z["boxes"].astype(np.int64))
            if boxes.shape != (shape[0], 4):
                raise ValueError("proposals boxes do not match the masks")
            return cls(None, iou=torch.from_numpy(z["iou"]).to(device),
                       descriptors=torch.from_numpy(z["descriptors"]).to(device),
                       image_size=tuple(header["image_size"]), meta=header.get("meta", {}),
                       packed=_PackedLogits(signs.reshape(shape).to(device), values, offsets,
                                            int(header["radius"]), boxes.to(device)))


@dataclass
class Detections:
    """Final instances for one image, best first.

    boxes: [N, 4] float xyxy with inclusive max pixel indices (the method's box convention).
    masks: per instance a full-resolution boolean mask stored as a crop: (x0, y0, crop[h, w]).
    labels: class keys of the memory bank. scores: decayed cosine scores in (0, 1].
    """

    image_size: tuple[int, int]
    boxes: np.ndarray
    scores: np.ndarray
    labels: list[str]
    masks: list[tuple[int, int, np.ndarray]]

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def empty(cls, image_size: tuple[int, int]) -> "Detections":
        return cls(image_size, np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), [], [])

    def mask(self, i: int) -> np.ndarray:
        """Full-size boolean mask of instance i."""
        H, W = self.image_size
        x0, y0, crop = self.masks[i]
        out = np.zeros((H, W), dtype=bool)
        out[y0:y0 + crop.shape[0], x0:x0 + crop.shape[1]] = crop
        return out
