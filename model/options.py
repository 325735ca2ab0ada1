"""Every hyperparameter of the NTT method in one place (docs/method.md explains each).

Defaults are the reference code's headline configuration, except the two named deviations whose
default is not the reference's (`point_batch_size`, `drop_empty_masks`: both cheap on memory or
cache size, both documented with their effect). Every other deviation is off by default.
Deviations that have no switch are listed at the end of this file.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal, get_args

Merge = Literal["soft", "graph", "graph-normalised"]
Negatives = Literal["off", "suppress", "suppress-nearest"]
MERGES, NEGATIVES = get_args(Merge), get_args(Negatives)


@dataclass(frozen=True)
class MethodOptions:
    # --- target image / SAM2 proposals (docs/method.md, "Proposals") ---
    sam_image_size: int = 1024          # target resized to S×S (aspect ratio ignored), PIL bicubic
    points_per_side: int = 32           # n×n single-point prompts
    iou_threshold: float = 0.4          # keep prompts whose predicted IoU is above this
    # --- DINOv2 (docs/method.md, "References", "Proposals") ---
    dino_image_size: int = 518          # input side; 14-px patches
    context_ratio: float = 0.2          # reference crop side = (1 + ratio) × longer bbox side
    # --- matching (docs/method.md, "Matching") ---
    nms_threshold: float = 0.5          # class-aware box NMS, ranked by SAM predicted IoU
    pre_merge_factor: int = 8           # keep pre_merge_factor × K NMS survivors before soft merge
    max_detections: int = 100           # K: top-K after soft merging (display caps cut the result later)
    merge_exponent: float = 0.5         # score *= (1 - IoS) ** exponent
    score_threshold: float = 0.0        # the method has none (keeps score > 0); pre-annotation sets one
    # --- performance knob that does not change results ---
    lazy_topk: bool = True              # upsample to full resolution only masks that can reach the top-K
    # --- named deviations (docs/method.md, "Deviations") ---
    point_batch_size: int = 64          # prompts per decoder call; reference 256 (others: float rounding)
    drop_empty_masks: bool = True       # drop empty SAM2 masks before NMS (reference: they hold cap slots)
    grid: Literal["ntt", "amg"] = "ntt"  # "amg": SAM AMG cell-centre grid instead of the border grid
    antialias: bool = False             # antialias the torch bicubic resizes (reference: no antialias)
    merge_max_side: int = 0             # >0: soft merge at reduced resolution (huge photos), 0 = full res
    bf16: bool = False                  # CUDA bf16 autocast for encoders + decoder (reference: fp32)
    # --- performance: within float rounding of eager (docs/method.md, "Cold path") ---
    compile_decoder: bool = True        # torch.compile the SAM2 mask decoder (falls back to eager on failure)
    # --- named variants of matching (docs/method.md, "Variants"); off by default ---
    merge: Merge = "soft"               # step 4: soft merge or graph diffusion
    graph_alpha: float = 0.3            # graph diffusion: weight of the walk against the personalisation
    graph_steps: int = 30               # graph diffusion: most iterations
    graph_lambda: float = 0.5           # graph diffusion: score *= max(0, 1 - r) ** lambda
    negatives: Negatives = "off"        # drop a class where a negative of it is nearer (see docs)

    def __post_init__(self) -> None:
        for name, allowed in (("merge", MERGES), ("negatives", NEGATIVES)):
            if getattr(self, name) not in allowed:  # a misspelt variant must not run another one
                raise ValueError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    def cache_key(self) -> str:
        """Options that change proposals (the per-image cache key part). Deviations at their
        default add nothing, so caches written before they were named stay valid. The compiled
        decoder is not part of it: its logits are within the method's tolerance of eager
        (tests/model/test_proposals.py), like another BLAS build's."""
        return (f"s{self.sam_image_size}-p{self.points_per_side}-i{self.iou_threshold}-"
                f"d{self.dino_image_size}-g{self.grid}-a{int(self.antialias)}-b{int(self.bf16)}"
                + (f"-q{self.point_batch_size}" if self.point_batch_size != 64 else "")
                + ("" if self.drop_empty_masks else "-e0"))


# Deviations with no switch (docs/method.md, "Deviations", explains each):
# * rectangle-only references become masks through the configured SAM2 model (box prompt, single-mask
#   output); the reference converted boxes with SAM v1 ViT-H, which this project does not ship;
# * no surviving proposal gives no detections (the reference raises);
# * a reference mask that misses every DINOv2 patch sample is skipped (the reference gets NaN);
# * classes may have different numbers of references (the reference needs K shots per class);
# * a candidate whose full-resolution mask is empty is dropped (the reference divides by zero);
# * IoS is clipped to 1 (rounding can put it a hair above, giving NaN).
