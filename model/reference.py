"""Reference instances -> descriptors (docs/method.md, "References"), and box -> mask via SAM2.

A reference descriptor is the soft-mask-weighted mean of the raw DINOv2 patch tokens of an
object-centred crop: r = Σ w_p F_p / Σ w_p, with w_p the soft crop mask sampled at the top-left
pixel of each patch. It is not normalised here (the class prototype averages raw r's).
"""
from __future__ import annotations

import logging

import numpy as np
import pycocotools.mask as mask_utils
import torch
import torch.nn.functional as F
from torch import nn

from model.dino import dino_patch_tokens
from model.interactive import decode_prompts
from model.options import MethodOptions
from model.preprocess import image_to_tensor, to_dino_input
from model.proposals import SamImageState, encoder_autocast

log = logging.getLogger(__name__)


def mask_bbox_xywh(mask: np.ndarray) -> tuple[float, float, float, float]:
    """COCO bbox [x, y, w, h] of a binary mask (pycocotools: w, h = pixel extent)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    x, y, w, h = mask_utils.toBbox(rle).tolist()
    return x, y, w, h


def reference_crop_box(bbox_xywh: tuple[float, float, float, float], image_w: int, image_h: int,
                       context_ratio: float) -> tuple[int, int, int, int]:
    """Square context crop (x0, y0, x1, y1), x1/y1 exclusive, exactly as the reference:

    box corners truncated to int (x1 = int(x), x2 = int(x + w), same for y); side
    (1 + ratio) · max(x2 - x1, y2 - y1) centred on ((x1 + x2) / 2, (y1 + y2) / 2); each crop edge
    truncated toward zero with int(), then clipped to [0, W] / [0, H] (near borders the crop is a
    non-square rectangle).
    """
    bx, by, bw, bh = (float(v) for v in bbox_xywh)
    x1, y1, x2, y2 = int(bx), int(by), int(bx + bw), int(by + bh)
    mid_x, mid_y = (x1 + x2) * 0.5, (y1 + y2) * 0.5
    half = max(x2 - x1, y2 - y1) * (1.0 + context_ratio) * 0.5
    return (max(0, int(mid_x - half)), max(0, int(mid_y - half)),
            min(int(image_w), int(mid_x + half)), min(int(image_h), int(mid_y + half)))


def patch_weights(mask: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """Soft [S, S] mask -> [h, w] patch weights with legacy "nearest": the value at pixel
    (floor(i·S/h), floor(j·S/w)), i.e. the top-left pixel of each patch; values stay soft."""
    return F.interpolate(mask[None, None].float(), size=tuple(grid_hw), mode="nearest")[0, 0]


@torch.inference_mode()
def reference_descriptor(dino: nn.Module, image: np.ndarray, mask: np.ndarray,
                         opts: MethodOptions) -> np.ndarray | None:
    """Descriptor float32 [D] of one reference instance (HxWx3 uint8 image, HxW bool mask).

    None, with a warning, when the mask is empty or misses every patch sample (the reference
    would produce NaN here; docs/method.md, "Deviations").
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask {mask.shape} does not match image {image.shape[:2]}")
    if not mask.any():
        log.warning("reference mask is empty: no descriptor")
        return None
    x0, y0, x1, y1 = reference_crop_box(mask_bbox_xywh(mask), image.shape[1], image.shape[0],
                                        opts.context_ratio)
    if x1 <= x0 or y1 <= y0:
        log.warning("reference crop %s is empty: no descriptor", (x0, y0, x1, y1))
        return None
    device = next(dino.parameters()).device
    size = opts.dino_image_size
    # crop the uint8 data first: same values as cropping the [0, 1] float image, less memory
    crop = image_to_tensor(image[y0:y1, x0:x1]).to(device)
    crop_mask = torch.from_numpy(np.ascontiguousarray(mask[y0:y1, x0:x1])).to(device)[None, None].float()
    soft = F.interpolate(crop_mask, size=(size, size), mode="bilinear", align_corners=False)[0, 0]
    with encoder_autocast(device, opts.bf16):
        tokens = dino_patch_tokens(dino, to_dino_input(crop, size, antialias=opts.antialias))
    tokens = tokens[0].float()  # [h, w, D]
    weights = patch_weights(soft, tokens.shape[:2])
    total = weights.sum()
    if not total > 0:
        log.warning("reference mask (%d px) misses every %dx%d patch sample: no descriptor",
                    int(mask.sum()), *tokens.shape[:2])
        return None
    descriptor = (weights[..., None] * tokens).sum(dim=(0, 1)) / total
    return descriptor.cpu().numpy().astype(np.float32)


@torch.inference_mode()
def box_to_mask(sam: nn.Module, state: SamImageState, box_xyxy: tuple[float, float, float, float]) -> np.ndarray:
    """HxW bool mask of a box prompt in original-image pixels (rectangle-only references).

    Single-mask output (multimask_output=False) as the reference's box -> mask conversion, decoded
    the way SAM2ImagePredictor.predict(box=...) does: box scaled to the S-px frame, `no_mem_embed`
    added to the image embedding (the model is trained that way for single images; only the
    proposal path omits it), logits bilinearly upsampled to (H, W), > 0. The reference used
    another model for this step: a named deviation (docs/method.md, "Deviations").
    """
    H, W = state.orig_hw
    device = state.image_embed.device
    box = torch.as_tensor(box_xyxy, dtype=torch.float32, device=device).reshape(1, 2, 2)
    box = box / torch.tensor([W, H], dtype=torch.float32, device=device) * state.input_size
    labels = torch.tensor([[2, 3]], dtype=torch.int32, device=device)
    logits, _ = decode_prompts(sam, state, box, labels, multimask=False)
    full = F.interpolate(logits[:, :1].float(), size=(H, W), mode="bilinear", align_corners=False)
    return (full[0, 0] > 0).cpu().numpy()
