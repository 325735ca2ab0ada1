"""Names of the supported models, their official files and download URLs.

Torch-free on purpose: the web process (settings, /setup's model_version) reads these names without
importing torch or loading any model.
"""
from __future__ import annotations

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

# name -> (timm architecture, Meta's checkpoint file name). No register tokens (docs/method.md, "Models").
# timm calls Meta's ViT-g/14 (SwiGLU, 1536 wide) "vit_giant_patch14_dinov2".
DINO_MODELS: dict[str, tuple[str, str]] = {
    "dinov2-s": ("vit_small_patch14_dinov2.lvd142m", "dinov2_vits14_pretrain.pth"),
    "dinov2-b": ("vit_base_patch14_dinov2.lvd142m", "dinov2_vitb14_pretrain.pth"),
    "dinov2-l": ("vit_large_patch14_dinov2.lvd142m", "dinov2_vitl14_pretrain.pth"),
    "dinov2-g": ("vit_giant_patch14_dinov2.lvd142m", "dinov2_vitg14_pretrain.pth"),
}

SAM2_URL_DIRS = {
    "sam2": "https://dl.fbaipublicfiles.com/segment_anything_2/072824/",
    "sam2.1": "https://dl.fbaipublicfiles.com/segment_anything_2/092824/",
}
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/{arch}/{arch}_pretrain.pth"


def checkpoint_filename(name: str) -> str:
    """Official file name of a model name ("sam2-l" -> "sam2_hiera_large.pt")."""
    if name in SAM_MODELS:
        return SAM_MODELS[name][1]
    if name in DINO_MODELS:
        return DINO_MODELS[name][1]
    raise ValueError(f"unknown model {name!r}; choose one of {sorted(SAM_MODELS) + sorted(DINO_MODELS)}")


def checkpoint_url(name: str) -> str:
    """Official download URL of a model name."""
    filename = checkpoint_filename(name)
    if name in DINO_MODELS:
        return DINOV2_URL.format(arch=filename.removesuffix("_pretrain.pth"))
    return SAM2_URL_DIRS[name.split("-")[0]] + filename


def engine_name(sam_model: str, dino_model: str) -> str:
    """Model part of the backend's model_version, e.g. 'sam2-l+dinov2-l'."""
    return f"{sam_model}+{dino_model}"
