"""The one small interface the backend (and the CLI) use: build the two encoders once, then encode
references, propose masks for a target image, and match proposals against a memory bank.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from model.bank import MemoryBank
from model.catalog import engine_name
from model.checkpoints import resolve_device, weights_fingerprint
from model.dino import build_dino
from model.embedding import EmbeddingCache, image_key
from model.interactive import Click, Segmentation, segment
from model.matching import MatchResult, match_full
from model.options import MethodOptions
from model.proposals import SamImageState, compute_proposals, decode_points, encode_image, point_grid
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
    # SAM2 image embeddings kept for clicks (model.embedding): 16 MiB per image at S = 1024
    embedding_cache_items: int = 16
    embedding_cache_bytes: int = 512 * 2**20


class EmbeddingNotCached(LookupError):
    """A click named an image by key whose embedding is not (or no longer) in memory: send the image."""


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
        self.embeddings = EmbeddingCache(config.embedding_cache_items, config.embedding_cache_bytes)
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

    def propose(self, image: np.ndarray, key: str | None = None) -> Proposals:
        """Class-agnostic proposals (SAM2 point grid + DINOv2 descriptors); cacheable per image.

        The image's SAM2 embedding goes through the embedding cache under `key` (the image file's
        sha256; default: a hash of the pixels), so later clicks on this image are warm.
        """
        with self._lock, torch.inference_mode():
            state = self._image_state(image, key)
            return compute_proposals(self.sam, self.dino, image, self.options, state=state)

    def warm(self, image: np.ndarray, key: str | None = None) -> bool:
        """Compute the image's SAM2 embedding now (a task was opened) unless it is in memory; True
        if it had to be computed."""
        with self._lock, torch.inference_mode():
            known = self._embedding_key(image, key) in self.embeddings
            self._image_state(image, key)
            return not known

    def segment(self, image_or_key: np.ndarray | str, points: Sequence[Click] = (),
                box: tuple[float, float, float, float] | None = None, multimask: bool | None = None,
                *, key: str | None = None) -> Segmentation:
        """One mask for clicks [(x, y, positive)] and/or a box (x0, y0, x1, y1), in original-image
        pixels (model.interactive.segment). `image_or_key`: the HxWx3 uint8 image (its embedding is
        computed unless cached under `key`), or the key of an image warmed or proposed before
        (EmbeddingNotCached if it is not in memory any more)."""
        with self._lock, torch.inference_mode():
            if isinstance(image_or_key, str):
                state = self.embeddings.get(self._embedding_key(None, image_or_key))
                if state is None:
                    raise EmbeddingNotCached(f"no SAM2 embedding in memory for image {image_or_key[:16]}...; "
                                             "send the image")
            else:
                state = self._image_state(image_or_key, key)
            return segment(self.sam, state, points, box, multimask)

    def prepare(self) -> float:
        """Compile the SAM2 decoder now (at worker start) instead of on the first prediction, when
        opts.compile_decoder; seconds spent (0 when eager). On failure the decoder stays eager."""
        if not self.options.compile_decoder:
            return 0.0
        t0 = time.perf_counter()
        size = self.options.sam_image_size
        with self._lock, torch.inference_mode():
            blank = encode_image(self.sam, torch.zeros(1, 3, size, size), bf16=self.options.bf16)
            batch = min(self.options.point_batch_size, self.options.points_per_side ** 2)
            decode_points(self.sam, blank, point_grid(self.options.points_per_side, size)[:batch], batch,
                          compiled=True)
        return time.perf_counter() - t0

    def _embedding_key(self, image: np.ndarray | None, key: str | None) -> str:
        """Embedding cache key: the image's key, this engine's models and the options that change
        the embedding (SAM2 input size, bf16)."""
        return (f"{self.name}|s{self.options.sam_image_size}-b{int(self.options.bf16)}|"
                f"{key if key is not None else image_key(image)}")

    def _image_state(self, image: np.ndarray, key: str | None) -> SamImageState:
        """SAM2 features of `image` from the embedding cache, computed on a miss (caller holds the lock)."""
        cache_key = self._embedding_key(image, key)
        state = self.embeddings.get(cache_key)
        if state is None or state.orig_hw != tuple(image.shape[:2]):
            state = encode_image(self.sam, to_sam_input(image, self.options.sam_image_size),
                                 orig_hw=image.shape[:2], bf16=self.options.bf16)
            self.embeddings.put(cache_key, state)
        return state

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
