"""Image -> encoder input tensors, with the reference's exact resampling (docs/method.md).

Tensors stay in [0, 1] until just before an encoder; ImageNet normalisation is the last step.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_sam_input(image: np.ndarray, size: int) -> torch.Tensor:
    """HxWx3 uint8 RGB -> [1, 3, S, S] float32 in [0, 1]: PIL bicubic resize to S×S, aspect ratio
    ignored, /255, no normalisation (the reference's target image loading)."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got {image.shape} {image.dtype}")
    resized = np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))
    return torch.from_numpy(resized.copy()).permute(2, 0, 1)[None].float().div(255.0)


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> [1, 3, H, W] float32 in [0, 1] at the original size (reference crops)."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float().div(255.0)


def imagenet_normalize(x: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std per RGB channel of a [B, 3, H, W] tensor in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def to_dino_input(x01: torch.Tensor, size: int, antialias: bool = False) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> torch bicubic (align_corners=False, no antialias in the reference;
    may overshoot [0, 1]) to size×size, then ImageNet normalisation."""
    x = F.interpolate(x01, size=(size, size), mode="bicubic", align_corners=False, antialias=antialias)
    return imagenet_normalize(x)
