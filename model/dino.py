"""Build DINOv2 by name through timm, with a strict load of Meta's original `.pth` files.

The method uses the final-LayerNorm patch tokens (method doc §4.2): `dino_patch_tokens`.
"""
from __future__ import annotations

from pathlib import Path

import timm
import torch
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import nn

from model.checkpoints import CheckpointError, load_state_dict_strict, read_checkpoint, resolve_device

# name -> (timm architecture, Meta's checkpoint file name). No register tokens (method doc §8).
# timm calls Meta's ViT-g/14 (SwiGLU, 1536 wide) "vit_giant_patch14_dinov2".
DINO_MODELS: dict[str, tuple[str, str]] = {
    "dinov2-s": ("vit_small_patch14_dinov2.lvd142m", "dinov2_vits14_pretrain.pth"),
    "dinov2-b": ("vit_base_patch14_dinov2.lvd142m", "dinov2_vitb14_pretrain.pth"),
    "dinov2-l": ("vit_large_patch14_dinov2.lvd142m", "dinov2_vitl14_pretrain.pth"),
    "dinov2-g": ("vit_giant_patch14_dinov2.lvd142m", "dinov2_vitg14_pretrain.pth"),
}


def build_dino(name: str, checkpoint: str | Path | None = None, *, random_weights: bool = False,
               device: str | torch.device | None = None) -> nn.Module:
    """timm DINOv2 (any input size divisible by 14, no head) in eval mode, fp32.

    checkpoint: Meta's `dinov2_vit*14_pretrain.pth` (timm's own layout loads too); exactly one of
    checkpoint / random_weights=True.
    """
    if name not in DINO_MODELS:
        raise ValueError(f"unknown DINOv2 model {name!r}; choose one of {list(DINO_MODELS)}")
    arch, filename = DINO_MODELS[name]
    if checkpoint is not None and random_weights:
        raise ValueError("build_dino: give either checkpoint=<path> or random_weights=True, not both")
    if checkpoint is None and not random_weights:
        raise ValueError(f"build_dino({name!r}) needs checkpoint=<path to {filename}> (python -m "
                         f"model.checkpoints --dino {name} downloads it) or random_weights=True (tests)")
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
