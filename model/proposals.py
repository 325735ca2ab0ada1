"""Class-agnostic proposals of one image: SAM2 point-grid masks + mask-pooled DINOv2 descriptors.

docs/method.md, "Proposals". SAM2 runs on the S×S [0, 1] image (ImageNet-normalised), WITHOUT adding
`no_mem_embed` to the image embedding (as the reference, unlike SAM2ImagePredictor); every prompt
is one positive point and keeps the best of the 3 multimask outputs by predicted IoU.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.dino import dino_patch_tokens
from model.options import MethodOptions
from model.preprocess import imagenet_normalize, to_dino_input, to_sam_input
from model.types import Proposals

log = logging.getLogger(__name__)

_POOL_CHUNK = 64  # masks per [n, s*s] @ [s*s, D] product: 64 × 256² float32 = 16 MiB
_COMPILED: "weakref.WeakKeyDictionary[nn.Module, nn.Module]" = weakref.WeakKeyDictionary()
_COMPILE_LOCK = threading.Lock()


@dataclass
class SamImageState:
    """SAM2 image features of one image, reused by every prompt batch and by box prompts.

    image_embed: [1, 256, S/16, S/16]; high_res_feats: [[1, 32, S/4, S/4], [1, 64, S/8, S/8]]
    (already projected by the decoder's conv_s0/conv_s1); input_size: S; orig_hw: (H, W) of the
    original image, the size box_to_mask upsamples to.
    """

    image_embed: torch.Tensor
    high_res_feats: list[torch.Tensor]
    input_size: int
    orig_hw: tuple[int, int]


def encoder_autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """CUDA bf16 autocast for the encoders when asked (a deviation option), else nothing."""
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def point_grid(points_per_side: int, size: int, kind: str = "ntt") -> torch.Tensor:
    """[n², 2] (x, y) point prompts in the S-px frame, passed to the prompt encoder as they are.

    "ntt" (reference): both axes linspace(0, S-1, n) + 0.5, i.e. 0.5 ... S-0.5 with points on
    the border; ordered as the reference's meshgrid(indexing="ij") flattening: x is the outer
    (slow) index, y the inner one. "amg" (deviation): SAM AMG cell centres (i + 0.5) * S / n,
    y outer, x inner, as SAM's build_point_grid.
    """
    n = int(points_per_side)
    if kind == "ntt":
        axis = torch.linspace(0, size - 1, n)
        xs, ys = torch.meshgrid(axis, axis, indexing="ij")
        return torch.stack((xs.reshape(-1), ys.reshape(-1)), dim=-1) + 0.5
    if kind == "amg":
        axis = (torch.arange(n, dtype=torch.float64) + 0.5) / n
        ys, xs = torch.meshgrid(axis, axis, indexing="ij")
        return (torch.stack((xs.reshape(-1), ys.reshape(-1)), dim=-1) * size).float()
    raise ValueError(f"unknown point grid {kind!r}: 'ntt' or 'amg'")


@torch.inference_mode()
def encode_image(sam: nn.Module, x_sam: torch.Tensor, *, orig_hw: tuple[int, int] | None = None,
                 bf16: bool = False) -> SamImageState:
    """SAM2 image encoder on a [1, 3, S, S] [0, 1] tensor (ImageNet-normalised here)."""
    size = int(sam.image_size)
    if tuple(x_sam.shape) != (1, 3, size, size):
        raise ValueError(f"SAM2 input must be [1, 3, {size}, {size}], got {list(x_sam.shape)}")
    device = sam.device
    with encoder_autocast(device, bf16):
        backbone_out = sam.forward_image(imagenet_normalize(x_sam.to(device)))
    _, vision_feats, _, feat_sizes = sam._prepare_backbone_features(backbone_out)
    # [HW, 1, C] -> [1, C, h, w]; deliberately no `+ sam.no_mem_embed` (docs/method.md, "Proposals")
    feats = [f.permute(1, 2, 0).reshape(1, -1, *hw).float() for f, hw in zip(vision_feats, feat_sizes)]
    return SamImageState(feats[-1], feats[:-1], size, tuple(orig_hw) if orig_hw else (size, size))


def mask_decoder(sam: nn.Module, compiled: bool = False) -> nn.Module:
    """SAM2's mask decoder, or (compiled=True, opts.compile_decoder) a torch.compile'd twin built
    once per model. The decoder is memory-bound (adds, copies and layer norms over the per-prompt
    image embedding dominate it); compiling fuses them. The twin shares the weights; its outputs
    differ from eager by float rounding only, hence an opt-in deviation."""
    if not compiled:
        return sam.sam_mask_decoder
    with _COMPILE_LOCK:
        twin = _COMPILED.get(sam)
        if twin is None:
            twin = _COMPILED[sam] = torch.compile(sam.sam_mask_decoder, dynamic=False)
        return twin


@torch.inference_mode()
def decode_points(sam: nn.Module, state: SamImageState, points: torch.Tensor,
                  batch_size: int, compiled: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One positive point per prompt -> (low-res logits [N, S/4, S/4], predicted IoU [N]).

    The decoder returns the 3 multimask outputs; each prompt keeps the one with the highest
    predicted IoU. All N prompts are decoded, batch_size at a time (no dropped remainder).
    """
    device = state.image_embed.device
    decoder = mask_decoder(sam, compiled)
    image_pe = sam.sam_prompt_encoder.get_dense_pe()
    all_logits, all_iou = [], []
    for chunk in points.to(device=device, dtype=torch.float32).split(max(1, int(batch_size))):
        n = chunk.shape[0]
        # the prompt encoder adds +0.5 and a padding point (label -1) itself
        sparse, dense = sam.sam_prompt_encoder(
            points=(chunk[:, None, :], torch.ones(n, 1, dtype=torch.int32, device=device)),
            boxes=None, masks=None)
        inputs = dict(image_embeddings=state.image_embed, image_pe=image_pe, sparse_prompt_embeddings=sparse,
                      dense_prompt_embeddings=dense, multimask_output=True, repeat_image=True,
                      high_res_features=state.high_res_feats)
        try:
            logits, iou, _, _ = decoder(**inputs)
        except Exception as exc:  # noqa: BLE001 - a failed compile (no compiler, old GPU) must not stop predictions
            if decoder is sam.sam_mask_decoder:
                raise
            log.warning("compiled SAM2 mask decoder failed (%s: %s); using the eager one",
                        type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
            with _COMPILE_LOCK:
                _COMPILED[sam] = decoder = sam.sam_mask_decoder
            logits, iou, _, _ = decoder(**inputs)
        best = iou.argmax(dim=1)
        rows = torch.arange(n, device=device)
        all_logits.append(logits[rows, best].float())
        all_iou.append(iou[rows, best].float())
    if not all_logits:
        side = state.input_size // 4
        return torch.zeros(0, side, side, device=device), torch.zeros(0, device=device)
    return torch.cat(all_logits), torch.cat(all_iou)


def filter_by_iou(logits: torch.Tensor, iou: torch.Tensor, threshold: float,
                  drop_empty: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep prompts with predicted IoU > threshold (strict); with drop_empty (the named deviation
    opts.drop_empty_masks), only those whose mask has a positive pixel.

    The reference keeps empty masks until their NaN descriptor (0/0; here a zero vector, score 0)
    fails `score > 0` after NMS. Their box is [0, 0, 0, 0], a zero-area box that suppresses
    nothing, so dropping them early changes no other mask's fate except through the pre-merge cap:
    in the reference they can take some of its pre_merge_factor × K slots.
    """
    keep = iou > threshold
    if drop_empty:
        keep &= (logits > 0).flatten(1).any(dim=1)
    return logits[keep], iou[keep]


def pool_descriptors(dino_tokens: torch.Tensor, lowres_logits: torch.Tensor,
                     chunk: int = _POOL_CHUNK) -> torch.Tensor:
    """[h, w, D] DINOv2 tokens, [N, s, s] logits -> [N, D] L2-normalised mask-mean descriptors.

    Features are bilinearly upsampled (align_corners=False) to the logits' size and averaged over
    the pixels with logit > 0. An empty mask gives a zero vector (the reference: NaN).
    """
    n, hs, ws = lowres_logits.shape
    feats = dino_tokens.float().permute(2, 0, 1)[None]
    # antialias as the reference; it has no effect when upsampling
    up = F.interpolate(feats, size=(hs, ws), mode="bilinear", align_corners=False, antialias=True)
    up = up[0].reshape(up.shape[1], hs * ws).T  # [s*s, D]
    out = []
    for part in lowres_logits.split(max(1, int(chunk))):
        masks = (part > 0).reshape(part.shape[0], -1).to(up.dtype)
        out.append((masks @ up) / masks.sum(dim=1, keepdim=True).clamp_min(1.0))
    if not out:
        return up.new_zeros(0, up.shape[1])
    return F.normalize(torch.cat(out), p=2, dim=-1)


def build_proposals(lowres_logits: torch.Tensor, iou: torch.Tensor, dino_tokens: torch.Tensor,
                    image_size: tuple[int, int], opts: MethodOptions) -> Proposals:
    """Decoder outputs of all prompts -> Proposals (IoU filter, empty masks out, descriptors)."""
    logits, iou = filter_by_iou(lowres_logits.float(), iou.float(), opts.iou_threshold, opts.drop_empty_masks)
    descriptors = pool_descriptors(dino_tokens, logits)
    return Proposals(logits=logits, iou=iou, descriptors=descriptors,
                     image_size=(int(image_size[0]), int(image_size[1])))


@torch.inference_mode()
def compute_proposals(sam: nn.Module, dino: nn.Module, image: np.ndarray,
                      opts: MethodOptions, state: SamImageState | None = None) -> Proposals:
    """The proposal stage (docs/method.md, "Proposals") for one HxWx3 uint8 RGB image. Tensors stay
    on the models' device and are inference tensors (read freely; .clone() before modifying them
    in place). `state`: this image's SAM2 features when already computed (model.embedding)."""
    size = opts.sam_image_size
    if int(sam.image_size) != size:
        raise ValueError(f"opts.sam_image_size={size} but the SAM2 model was built for {sam.image_size}")
    device = sam.device
    x = to_sam_input(image, size).to(device)
    # DINOv2 sees the S×S [0, 1] image resized again (torch bicubic), as the reference
    dino_device = next(dino.parameters()).device
    with encoder_autocast(dino_device, opts.bf16):
        tokens = dino_patch_tokens(dino, to_dino_input(x.to(dino_device), opts.dino_image_size,
                                                       antialias=opts.antialias))
    if state is None:
        state = encode_image(sam, x, orig_hw=image.shape[:2], bf16=opts.bf16)
    elif state.input_size != size or state.orig_hw != tuple(image.shape[:2]):
        raise ValueError(f"SAM2 features of a {state.orig_hw} image at {state.input_size} px do not fit "
                         f"this {tuple(image.shape[:2])} image at {size} px")
    points = point_grid(opts.points_per_side, size, opts.grid)
    with encoder_autocast(device, opts.bf16):  # the decoder too: it is most of the cold-path time
        logits, iou = decode_points(sam, state, points, opts.point_batch_size, opts.compile_decoder)
    return build_proposals(logits, iou, tokens[0].float().to(device), image.shape[:2], opts)
