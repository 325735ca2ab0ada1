"""Build SAM2 by name from the official `sam2` package, with a strict checkpoint load.

Only the image encoder, prompt encoder and mask decoder are used (method doc §8); the model is
returned in eval mode, fp32.
"""
from __future__ import annotations

from pathlib import Path

import torch

from model.checkpoints import CheckpointError, load_state_dict_strict, read_checkpoint, resolve_device

# name -> (hydra config inside the sam2 package, official checkpoint file name)
SAM_MODELS: dict[str, tuple[str, str]] = {
    "sam2-t": ("configs/sam2/sam2_hiera_t.yaml", "sam2_hiera_tiny.pt"),
    "sam2-s": ("configs/sam2/sam2_hiera_s.yaml", "sam2_hiera_small.pt"),
    "sam2-b+": ("configs/sam2/sam2_hiera_b+.yaml", "sam2_hiera_base_plus.pt"),
    "sam2-l": ("configs/sam2/sam2_hiera_l.yaml", "sam2_hiera_large.pt"),
    "sam2.1-t": ("configs/sam2.1/sam2.1_hiera_t.yaml", "sam2.1_hiera_tiny.pt"),
    "sam2.1-s": ("configs/sam2.1/sam2.1_hiera_s.yaml", "sam2.1_hiera_small.pt"),
    "sam2.1-b+": ("configs/sam2.1/sam2.1_hiera_b+.yaml", "sam2.1_hiera_base_plus.pt"),
    "sam2.1-l": ("configs/sam2.1/sam2.1_hiera_l.yaml", "sam2.1_hiera_large.pt"),
}


def build_sam(name: str, checkpoint: str | Path | None = None, *, random_weights: bool = False,
              device: str | torch.device | None = None, image_size: int | None = None) -> torch.nn.Module:
    """SAM2Base for `name` with the official weights file, or random weights (tests only).

    image_size overrides the config's 1024 input size (smaller, faster maps for tests); device
    defaults to CUDA when available, else CPU.
    """
    if name not in SAM_MODELS:
        raise ValueError(f"unknown SAM2 model {name!r}; choose one of {list(SAM_MODELS)}")
    config, filename = SAM_MODELS[name]
    if checkpoint is not None and random_weights:
        raise ValueError("build_sam: give either checkpoint=<path> or random_weights=True, not both")
    if checkpoint is None and not random_weights:
        raise ValueError(f"build_sam({name!r}) needs checkpoint=<path to {filename}> (python -m "
                         f"model.checkpoints --sam {name} downloads it) or random_weights=True (tests)")
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
    model = build_sam2(config, ckpt_path=None, device="cpu", mode="eval",
                       hydra_overrides_extra=overrides)
    if state_dict is not None:
        load_state_dict_strict(model, state_dict, checkpoint, expected)
    return model.to(device=resolve_device(device), dtype=torch.float32).eval()
