"""Build SAM2 by name from the official `sam2` package, with a strict checkpoint load.

Only the image encoder, prompt encoder and mask decoder are used (docs/method.md, "Models"); the model is
returned in eval mode, fp32.
"""
from __future__ import annotations

from pathlib import Path

import torch

from model.catalog import SAM_MODELS
from model.checkpoints import (CheckpointError, load_state_dict_strict, random_init, read_checkpoint,
                               require_one_source, resolve_device)



def build_sam(name: str, checkpoint: str | Path | None = None, *, random_weights: bool = False,
              device: str | torch.device | None = None, image_size: int | None = None) -> torch.nn.Module:
    """SAM2Base for `name` with the official weights file, or random weights (tests only).

    image_size overrides the config's 1024 input size (smaller, faster maps for tests); device
    defaults to CUDA when available, else CPU.
    """
    if name not in SAM_MODELS:
        raise ValueError(f"unknown SAM2 model {name!r}; choose one of {list(SAM_MODELS)}")
    config = SAM_MODELS[name][0]
    require_one_source(name, checkpoint, random_weights)
    from sam2.build_sam import build_sam2

    expected = f"{name} ({config})"
    state_dict = None
    if checkpoint is not None:  # read (and reject) the file before spending time on the model
        ckpt = read_checkpoint(checkpoint, expected)
        if not isinstance(ckpt, dict) or "model" not in ckpt:
            found = list(ckpt)[:3] if isinstance(ckpt, dict) else type(ckpt).__name__
            raise CheckpointError(f"checkpoint {checkpoint} is not an official SAM2 file for {expected}: "
                                  f"no 'model' entry (expected {{'model': state_dict}}, found {found})")
        state_dict = ckpt["model"]
    overrides = [f"++model.image_size={int(image_size)}"] if image_size else []
    with random_init(random_weights):
        model = build_sam2(config, ckpt_path=None, device="cpu", mode="eval",
                           hydra_overrides_extra=overrides)
    if state_dict is not None:
        load_state_dict_strict(model, state_dict, checkpoint, expected)
    return model.to(device=resolve_device(device), dtype=torch.float32).eval()
