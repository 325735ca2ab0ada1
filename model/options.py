"""Every hyperparameter of the NTT method in one place.

Defaults are the reference code's headline configuration (see README, "The method"). Anything that
deviates from the reference is a named option that is off (or at the reference value) by default.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal


@dataclass(frozen=True)
class MethodOptions:
    # --- target image / SAM2 proposals (method doc §6.1, §6.3) ---
    sam_image_size: int = 1024          # target resized to S×S (aspect ratio ignored), PIL bicubic
    points_per_side: int = 32           # 32×32 single-point prompts
    iou_threshold: float = 0.4          # keep prompts whose predicted IoU > 0.4
    # --- DINOv2 (method doc §4, §6.2) ---
    dino_image_size: int = 518          # 37×37 patches of 14 px
    context_ratio: float = 0.2          # reference crop side = (1 + 0.2) × longer bbox side
    # --- matching (method doc §6.5–6.9) ---
    nms_threshold: float = 0.5          # class-aware box NMS, ranked by SAM predicted IoU
    pre_merge_factor: int = 8           # keep 8 × max_detections NMS survivors before soft merge
    max_detections: int = 100           # top-K after soft merging
    merge_exponent: float = 0.5         # score *= (1 - IoS) ** 0.5
    score_threshold: float = 0.0        # the method has none (keeps score > 0); pre-annotation sets one
    # --- performance knobs that do not change results ---
    point_batch_size: int = 64          # prompts per decoder call (memory only; reference uses 256)
    lazy_topk: bool = True              # upsample to full resolution only masks that can reach the top-K
    # --- explicit deviations from the reference (all off by default) ---
    grid: Literal["ntt", "amg"] = "ntt"  # "amg": SAM AMG cell-centre grid instead of the border grid
    antialias: bool = False             # antialias the torch bicubic resizes (reference: no antialias)
    merge_max_side: int = 0             # >0: soft merge at reduced resolution (huge photos), 0 = full res
    bf16: bool = False                  # CUDA bf16 autocast for encoders + decoder (reference: fp32)
    compile_decoder: bool = False       # torch.compile the SAM2 mask decoder (fused kernels; not bit-exact)

    def to_dict(self) -> dict:
        return asdict(self)

    def cache_key(self) -> str:
        """Options that change proposals (the per-image cache key part)."""
        return (f"s{self.sam_image_size}-p{self.points_per_side}-i{self.iou_threshold}-"
                f"d{self.dino_image_size}-g{self.grid}-a{int(self.antialias)}-b{int(self.bf16)}"
                + ("-c1" if self.compile_decoder else ""))
