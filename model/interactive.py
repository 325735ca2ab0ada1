"""Interactive segmentation: clicks and a box on one image -> one mask (docs/method.md,
"Interactive segmentation").

SAM2ImagePredictor.predict's semantics on an image embedding computed beforehand (model.embedding
keeps them): points in original-image pixels with labels 1 (positive) / 0 (negative), a box in xyxy
pixels, coordinates scaled to the S×S input as SAM2Transforms does, the box's corners first (labels
2, 3), `no_mem_embed` added to the image embedding (as SAM2ImagePredictor.set_image; only the
proposal path omits it), SAM2's own prompt encoder and mask decoder, the chosen low-res mask
bilinearly upsampled to the original size and thresholded at 0.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.proposals import SamImageState

Click = tuple[float, float, bool]  # (x, y, positive) in original-image pixels


@dataclass(frozen=True)
class Segmentation:
    """mask: HxW bool at the original image size; score: SAM2's predicted IoU of that mask."""

    mask: np.ndarray
    score: float


def prompt_points(state: SamImageState, points: Sequence[Click] = (),
                  box: tuple[float, float, float, float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """([1, n, 2] coordinates in the S-px frame, [1, n] int labels) for SAM2's prompt encoder."""
    coords: list[tuple[float, float]] = []
    labels: list[int] = []
    if box is not None:
        x0, y0, x1, y1 = (float(v) for v in box)
        if x1 < x0 or y1 < y0:
            raise ValueError(f"box {tuple(box)} is not x0 <= x1, y0 <= y1")
        coords += [(x0, y0), (x1, y1)]
        labels += [2, 3]
    for point in points:
        x, y, positive = point
        coords.append((float(x), float(y)))
        labels.append(1 if positive else 0)
    if not coords:
        raise ValueError("a click or a box is needed")
    if not all(math.isfinite(v) for xy in coords for v in xy):
        raise ValueError(f"prompt coordinates must be finite numbers, got {coords}")
    device = state.image_embed.device
    H, W = state.orig_hw
    xy = torch.tensor(coords, dtype=torch.float32, device=device)
    xy[:, 0] = xy[:, 0] / W  # the order of SAM2Transforms.transform_coords: normalise, then scale
    xy[:, 1] = xy[:, 1] / H
    xy = xy * state.input_size
    return xy[None], torch.tensor([labels], dtype=torch.int32, device=device)


@torch.inference_mode()
def segment(sam: nn.Module, state: SamImageState, points: Sequence[Click] = (),
            box: tuple[float, float, float, float] | None = None,
            multimask: bool | None = None) -> Segmentation:
    """The best mask for clicks and/or a box on the image of `state`.

    multimask None: SAM2's three masks for a single click (an ambiguous prompt), one mask otherwise
    (SAM2ImagePredictor's advice); True asks for the three masks whatever the prompt (as Label
    Studio's SAM2 example backend always does). Of several masks, the highest predicted IoU wins.
    """
    coords, labels = prompt_points(state, points, box)
    if multimask is None:
        multimask = box is None and coords.shape[1] == 1
    lowres, iou = decode_prompts(sam, state, coords, labels, bool(multimask))
    best = int(iou[0].argmax())
    full = F.interpolate(lowres[:, best:best + 1].float(), size=state.orig_hw, mode="bilinear",
                         align_corners=False)
    return Segmentation(mask=(full[0, 0] > 0).cpu().numpy(), score=float(iou[0, best]))


def decode_prompts(sam: nn.Module, state: SamImageState, coords: torch.Tensor, labels: torch.Tensor,
                   multimask: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(low-res logits [1, M, 256, 256], predicted IoUs [1, M]) of one prompt set in the S-px frame,
    as SAM2ImagePredictor decodes a single image: `no_mem_embed` added to the image embedding (the
    model is trained that way for single images; only the proposal path omits it)."""
    sparse, dense = sam.sam_prompt_encoder(points=(coords, labels), boxes=None, masks=None)
    embed = state.image_embed
    if sam.directly_add_no_mem_embed:
        embed = embed + sam.no_mem_embed.reshape(1, -1, 1, 1)
    lowres, iou, _, _ = sam.sam_mask_decoder(
        image_embeddings=embed, image_pe=sam.sam_prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=multimask,
        repeat_image=False, high_res_features=state.high_res_feats)
    return lowres, iou
