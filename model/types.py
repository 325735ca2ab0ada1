"""Data types passed between the method's stages.

`Proposals` is the class-agnostic output of SAM2 + DINOv2 for one target image. It does not depend
on the memory bank, so it is cached per image and re-scored whenever the bank changes.
`Detections` is the final, per-image result of matching.
"""
from __future__ import annotations

import io
import json
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch

_FORMAT = 2


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


@dataclass
class Proposals:
    """Class-agnostic mask proposals of one image.

    logits: [N, h, w] float32 low-res SAM2 mask logits (h = w = sam_image_size // 4) of the kept
            prompts (best of 3 multimask outputs, predicted IoU > threshold, non-empty mask).
    iou: [N] predicted IoU of each kept prompt.
    descriptors: [N, D] float32, L2-normalised mask-pooled DINOv2 features.
    image_size: (H, W) of the original (EXIF-transposed) image.
    """

    logits: torch.Tensor
    iou: torch.Tensor
    descriptors: torch.Tensor
    image_size: tuple[int, int]
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.iou.shape[0])

    def to(self, device: torch.device | str) -> "Proposals":
        return Proposals(self.logits.to(device), self.iou.to(device), self.descriptors.to(device),
                         self.image_size, dict(self.meta))

    # ------------------------------------------------------------------ compact serialisation
    def upsample_radius(self) -> int:
        """Low-res neighbourhood radius that a bilinear (antialiased) resize to image_size reads."""
        h = self.logits.shape[-1] if self.logits.ndim == 3 else 1
        H, W = self.image_size
        scale = min(H, W) / max(h, 1)
        return 1 if scale >= 1 else int(np.ceil(1.0 / scale)) + 1

    def to_bytes(self) -> bytes:
        """Compact, exact-where-it-matters encoding.

        Masks are stored as their sign bits plus the float32 logits of the pixels whose neighbourhood
        holds both signs. Bilinear upsampling is a non-negative weighted mean of a small
        neighbourhood, so a uniform-sign neighbourhood yields that sign whatever the values, and a
        mixed one is reproduced bit-exactly: thresholded full-resolution masks are identical to
        those from the original logits. Descriptors and IoU are kept in float32.
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
            iou=self.iou.detach().float().cpu().numpy(),
            descriptors=self.descriptors.detach().float().cpu().numpy(),
            header=np.frombuffer(json.dumps({
                "format": _FORMAT, "shape": list(logits.shape), "radius": r,
                "image_size": list(self.image_size), "meta": self.meta}).encode(), dtype=np.uint8),
        )
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, device: torch.device | str | None = None) -> "Proposals":
        """Decode to_bytes output, directly onto `device` (the sign-boundary pass runs there)."""
        device = torch.device(device or "cpu")
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            header = json.loads(z["header"].tobytes().decode())
            if header.get("format") != _FORMAT:
                raise ValueError(f"unsupported proposals format {header.get('format')}")
            shape = tuple(header["shape"])
            packed = np.frombuffer(zlib.decompress(z["signs"].tobytes()), np.uint8)
            packed = packed.reshape(*shape[:-1], (shape[-1] + 7) // 8)
            signs = torch.from_numpy(np.unpackbits(packed, axis=-1, count=shape[-1]).view(bool))
            signs = signs.reshape(shape).to(device)
            logits = signs.float() * 2 - 1
            if shape[0]:
                boundary = _sign_boundary(signs, int(header["radius"]))
                logits[boundary] = torch.from_numpy(z["boundary_values"]).to(device)
            return cls(logits=logits, iou=torch.from_numpy(z["iou"]).to(device),
                       descriptors=torch.from_numpy(z["descriptors"]).to(device),
                       image_size=tuple(header["image_size"]), meta=header.get("meta", {}))


@dataclass
class Detections:
    """Final instances for one image, best first.

    boxes: [N, 4] float xyxy with inclusive max pixel indices (as the reference's mask_to_box).
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
