"""Official checkpoint files: where they live and how they are loaded, strictly.

Every load is strict: a file that does not fit its model raises CheckpointError with a one-line
message, never a silent partial load. Fetching the files is not the method's business:
scripts/download_checkpoints.py does it.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from model.catalog import SAM_MODELS, checkpoint_filename


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable or does not fit its model (one-line message)."""


def one_line(error: BaseException, limit: int = 160) -> str:
    """An exception as one line of at most `limit` characters (for CheckpointError messages)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[:limit] + "..."


# ------------------------------------------------------------------ names, URLs, paths
def require_one_source(name: str, checkpoint: object, random_weights: bool) -> None:
    """Exactly one of checkpoint / random_weights=True: a model is never silently random."""
    flag = "--sam" if name in SAM_MODELS else "--dino"
    if checkpoint is not None and random_weights:
        raise ValueError(f"{name}: give either checkpoint=<path> or random_weights=True, not both")
    if checkpoint is None and not random_weights:
        raise ValueError(f"{name} needs checkpoint=<path to {checkpoint_filename(name)}> (scripts/"
                         f"download_checkpoints.py {flag} {name} downloads it) or random_weights=True (tests)")


RANDOM_WEIGHTS_SEED = 0


@contextlib.contextmanager
def random_init(random_weights: bool) -> Iterator[None]:
    """Around building a model: random weights come from a fixed seed (on the CPU generator, the
    caller's CPU and CUDA states untouched), so every process of a test or benchmark deployment
    (web, workers) builds the same random model and computes the same proposals."""
    if not random_weights:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(RANDOM_WEIGHTS_SEED)
        yield


def default_checkpoint_dir() -> Path:
    """$MODEL_DIR/checkpoints when MODEL_DIR is set, else ./checkpoints."""
    model_dir = os.environ.get("MODEL_DIR")
    return Path(model_dir) / "checkpoints" if model_dir else Path("checkpoints")


def default_checkpoint_path(name: str) -> Path:
    return default_checkpoint_dir() / checkpoint_filename(name)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The given device, else CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# ------------------------------------------------------------------ strict loading
def read_checkpoint(path: str | Path, expected: str) -> object:
    """torch.load(weights_only=True) on CPU; CheckpointError when missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} for {expected} not found "
                              f"(scripts/download_checkpoints.py downloads the official files)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError, ... for bad files
        raise CheckpointError(f"checkpoint {path} for {expected} is not a readable PyTorch file "
                              f"(truncated or corrupt?): {one_line(e)}") from e


def load_state_dict_strict(model: nn.Module, state_dict: object, path: str | Path,
                           expected: str) -> None:
    """load_state_dict(strict=True), with our one-line message naming the file and the model."""
    if not isinstance(state_dict, Mapping) or not all(
            isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"checkpoint {path} does not match {expected}: "
                              f"not a state dict of tensors ({type(state_dict).__name__})")
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [k for k in own if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)]
    if missing or unexpected or mismatched:
        counts = [f"{len(missing)} missing keys", f"{len(unexpected)} unexpected keys"]
        examples = [f"missing {missing[0]!r}"] if missing else []
        examples += [f"unexpected {unexpected[0]!r}"] if unexpected else []
        if mismatched:
            k = mismatched[0]
            counts.append(f"{len(mismatched)} shape mismatches")
            examples.append(f"{k!r} is {tuple(state_dict[k].shape)}, model wants {tuple(own[k].shape)}")
        raise CheckpointError(f"checkpoint {path} does not match {expected}: "
                              f"{', '.join(counts)} (e.g. {'; '.join(examples)})")
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path} does not match {expected}: {one_line(e)}") from e


def verify_loads(name: str, path: str | Path) -> None:
    """Build the named model on CPU from the file; raises CheckpointError if it does not fit."""
    if name.startswith("dinov2-"):
        from model.dino import build_dino
        build_dino(name, path, device="cpu")
    else:
        from model.sam import build_sam
        build_sam(name, path, device="cpu")


# ------------------------------------------------------------------ identity
FINGERPRINT_HEX = 16   # characters of weights_fingerprint (64 bits: collisions are not a concern)
FINGERPRINT_THREADS = 8


def _tensor_digest(tensor: torch.Tensor) -> bytes:
    """sha256 of a tensor's bytes (OpenSSL's sha256 releases the GIL: tensors hash in parallel)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)  # bf16 too
    return hashlib.sha256(flat.numpy()).digest()


def weights_fingerprint(models: Mapping[str, nn.Module]) -> str:
    """Hex digest of the loaded weights: every state_dict tensor (parameters and persistent
    buffers) of each named model, by name, dtype, shape and every byte.

    Model names identify the architecture, not the weights: a fine-tuned checkpoint, or random
    weights from another seed, must not share cached proposals, banks or model versions with the
    official ones. Every byte is hashed (no sample), so any changed value changes the digest, and
    the same weights give the same digest in every process (state_dict order is deterministic).
    SAM2-L + DINOv2-L (2 GiB fp32) take about 1 s on 2 CPU cores.
    """
    named = [(f"{prefix}.{name}", t) for prefix, model in models.items() for name, t in model.state_dict().items()]
    threads = max(1, min(FINGERPRINT_THREADS, os.cpu_count() or 1))
    with ThreadPoolExecutor(threads, thread_name_prefix="fingerprint") as pool:
        digests = pool.map(_tensor_digest, [t for _, t in named])
        h = hashlib.sha256()
        for (name, t), digest in zip(named, digests):
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode() + digest)
    return h.hexdigest()[:FINGERPRINT_HEX]
