"""The one small interface the backend (and the CLI) use: build the two encoders once, then encode
references, propose masks for a target image, and match proposals against a memory bank.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from model.bank import MemoryBank
from model.catalog import engine_name
from model.checkpoints import resolve_device, weights_fingerprint
from model.dino import build_dino
from model.matching import MatchResult, match_full
from model.options import MethodOptions
from model.proposals import compute_proposals, encode_image
from model.preprocess import to_sam_input
from model.reference import box_to_mask, reference_descriptor
from model.sam import build_sam
from model.types import Detections, Proposals
from model.upsampled import UpsampledMasks

log = logging.getLogger(__name__)


@contextmanager
def match_pool(threads: int) -> Iterator[ThreadPoolExecutor]:
    """Threads for running many matches at once (a refresh re-scores many cached images).

    Their torch ops run single-threaded: the pool is the parallelism, and intra-op threads on top
    of it oversubscribe the cores (on 2 cores, 2 such threads re-match x1.6 faster than one; with
    torch's default intra-op threads in each, x1.1-1.4). The process's setting is restored after,
    for threads created later.
    """
    previous = torch.get_num_threads()
    try:
        with ThreadPoolExecutor(threads, thread_name_prefix="match", initializer=torch.set_num_threads,
                                initargs=(1,)) as pool:
            yield pool
    finally:
        torch.set_num_threads(previous)


@dataclass(frozen=True)
class EngineConfig:
    """Which models to build and how. Checkpoints are official files; random weights only on request."""

    sam_model: str = "sam2-l"
    dino_model: str = "dinov2-l"
    sam_checkpoint: str | None = None
    dino_checkpoint: str | None = None
    random_weights: bool = False
    device: str | None = None
    options: MethodOptions = field(default_factory=MethodOptions)


class Engine:
    """SAM2 + DINOv2 loaded once; thread-safe (one forward pass at a time).

    `fingerprint` identifies the loaded weights (model.checkpoints.weights_fingerprint), so what
    was computed with other weights under the same model names is never reused.
    """

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.options = config.options
        self.device = resolve_device(config.device)
        self.sam = build_sam(config.sam_model, config.sam_checkpoint, random_weights=config.random_weights,
                             device=self.device, image_size=self.options.sam_image_size)
        self.dino = build_dino(config.dino_model, config.dino_checkpoint, random_weights=config.random_weights,
                               device=self.device)
        self.fingerprint = weights_fingerprint({"sam": self.sam, "dino": self.dino})
        self._lock = threading.Lock()
        log.info("engine ready: %s on %s (weights %s, random: %s)", self.name, self.device, self.fingerprint,
                 config.random_weights)

    @property
    def name(self) -> str:
        """Model part of the backend's model_version, e.g. 'sam2-l+dinov2-l'."""
        return engine_name(self.config.sam_model, self.config.dino_model)

    def encode_references(self, image: np.ndarray, masks: list[np.ndarray | None] | None = None,
                          boxes: list[tuple[float, float, float, float] | None] | None = None
                          ) -> list[np.ndarray | None]:
        """One descriptor per reference instance of `image` (HxWx3 uint8 RGB).

        A reference is a mask, or a box (x0, y0, x1, y1 in pixels) that SAM2 turns into a mask first;
        the SAM2 image embedding is computed once per image and shared by all boxes. Returns None
        for a reference whose mask misses every DINOv2 patch sample (it cannot be described).
        """
        masks = list(masks or [])
        boxes = list(boxes or [])
        n = max(len(masks), len(boxes))
        masks += [None] * (n - len(masks))
        boxes += [None] * (n - len(boxes))
        out: list[np.ndarray | None] = []
        with self._lock, torch.inference_mode():
            state = None
            for mask, box in zip(masks, boxes):
                if mask is None and box is not None:
                    if state is None:
                        state = encode_image(self.sam, to_sam_input(image, self.options.sam_image_size),
                                             orig_hw=image.shape[:2], bf16=self.options.bf16)
                    mask = box_to_mask(self.sam, state, box)
                if mask is None or not mask.any():
                    out.append(None)
                    continue
                out.append(reference_descriptor(self.dino, image, mask, self.options))
        return out

    def propose(self, image: np.ndarray) -> Proposals:
        """Class-agnostic proposals (SAM2 point grid + DINOv2 descriptors); cacheable per image."""
        with self._lock, torch.inference_mode():
            return compute_proposals(self.sam, self.dino, image, self.options)

    def match(self, proposals: Proposals, bank: MemoryBank, score_threshold: float | None = None,
              max_detections: int | None = None, *, masks: UpsampledMasks | None = None,
              options: MethodOptions | None = None) -> Detections:
        """Label, de-duplicate and soft-merge proposals against the bank's class prototypes.

        Reads `proposals`, `bank` and the caller's mask cache `masks` and changes none of them;
        `max_detections` overrides the method's K (a deviation, see model.matching.match_full).
        `options`: match with these instead of the engine's (variants side by side on the same
        proposals and cache); their proposal options must be those the proposals were made with.
        """
        return self.match_full(proposals, bank, score_threshold, max_detections, masks=masks,
                               options=options).detections

    def match_full(self, proposals: Proposals, bank: MemoryBank, score_threshold: float | None = None,
                   max_detections: int | None = None, *, masks: UpsampledMasks | None = None,
                   options: MethodOptions | None = None) -> MatchResult:
        """`match`, also returning the masks it upsampled that `masks` lacked (for the caller's cache)."""
        with torch.inference_mode():
            return match_full(proposals.to(self.device), bank, options or self.options, score_threshold,
                              max_detections, masks=masks)

    def predict(self, image: np.ndarray, bank: MemoryBank, score_threshold: float | None = None,
                max_detections: int | None = None) -> Detections:
        """propose + match in one call."""
        if len(bank) == 0:
            return Detections.empty(image.shape[:2])
        return self.match(self.propose(image), bank, score_threshold, max_detections)

    def with_options(self, **changes) -> "Engine":
        """A view of this engine with other method options (same loaded models)."""
        other = object.__new__(Engine)
        other.__dict__.update(self.__dict__)
        other.options = replace(self.options, **changes)
        other.config = replace(self.config, options=other.options)
        return other
