"""Build DINOv2 by name through timm, with a strict load of Meta's original `.pth` files.

The method uses the final-LayerNorm patch tokens (docs/method.md, "Models"): `dino_patch_tokens`.
"""
from __future__ import annotations

from pathlib import Path

import timm
import torch
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import nn

from model.catalog import DINO_MODELS
from model.checkpoints import (CheckpointError, load_state_dict_strict, random_init, read_checkpoint,
                               require_one_source, resolve_device)



def build_dino(name: str, checkpoint: str | Path | None = None, *, random_weights: bool = False,
               device: str | torch.device | None = None) -> nn.Module:
    """timm DINOv2 (any input size divisible by 14, no head) in eval mode, fp32.

    checkpoint: Meta's `dinov2_vit*14_pretrain.pth` (timm's own layout loads too); exactly one of
    checkpoint / random_weights=True.
    """
    if name not in DINO_MODELS:
        raise ValueError(f"unknown DINOv2 model {name!r}; choose one of {list(DINO_MODELS)}")
    arch = DINO_MODELS[name][0]
    require_one_source(name, checkpoint, random_weights)
    expected = f"{name} ({arch})"
    state_dict = None
    if checkpoint is not None:  # read (and reject) the file before spending time on the model
        state_dict = read_checkpoint(checkpoint, expected)
        if not isinstance(state_dict, dict):
            raise CheckpointError(f"checkpoint {checkpoint} does not match {expected}: "
                                  f"not a state dict ({type(state_dict).__name__})")
        if "register_tokens" in state_dict:
            raise CheckpointError(f"checkpoint {checkpoint} does not match {expected}: it has "
                                  f"{state_dict['register_tokens'].shape[1]} register tokens "
                                  f"(a *_reg4 file); the method's DINOv2 has none")
    with random_init(random_weights):
        model = timm.create_model(arch, pretrained=False, num_classes=0, dynamic_img_size=True)
    if state_dict is not None:
        try:  # Meta -> timm key layout (drops mask_token, renames ViT-g SwiGLU weights)
            state_dict = checkpoint_filter_fn(dict(state_dict), model)
        except Exception as e:
            raise CheckpointError(f"checkpoint {checkpoint} does not match {expected}: "
                                  f"{' '.join(str(e).split())}") from e
        load_state_dict_strict(model, state_dict, checkpoint, expected)
    return model.to(device=resolve_device(device), dtype=torch.float32).eval()


def dino_patch_tokens(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Final-norm patch tokens [B, h, w, D] of an ImageNet-normalised batch [B, 3, H, W]."""
    tokens = model.forward_features(x)
    ph, pw = model.patch_embed.patch_size
    h, w = x.shape[-2] // ph, x.shape[-1] // pw
    tokens = tokens[:, model.num_prefix_tokens:]
    return tokens.reshape(x.shape[0], h, w, tokens.shape[-1])
