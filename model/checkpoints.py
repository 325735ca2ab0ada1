"""Official checkpoint files: where they come from, where they live, how they are loaded strictly.

    python -m model.checkpoints --sam sam2-l --dino dinov2-l [--dir D]

downloads the files that are missing (SAM 2.0 Hiera-L and DINOv2 ViT-L/14 are the method's
headline models). Every load is strict: a file that does not fit its model raises CheckpointError
with a one-line message, never a silent partial load (method doc §11.13).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import sys
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
import torch
from torch import nn
from tqdm import tqdm

from model.catalog import DINO_MODELS, SAM_MODELS, checkpoint_filename, checkpoint_url  # noqa: F401 (re-exported)

# sha256 of the official files. None = not known here (never guessed): a downloaded file is then
# verified by loading it strictly into its model instead.
SHA256: dict[str, str | None] = {
    "sam2_hiera_tiny.pt": None,
    "sam2_hiera_small.pt": None,
    "sam2_hiera_base_plus.pt": None,
    "sam2_hiera_large.pt": None,
    "sam2.1_hiera_tiny.pt": None,
    "sam2.1_hiera_small.pt": None,
    "sam2.1_hiera_base_plus.pt": None,
    "sam2.1_hiera_large.pt": None,
    "dinov2_vits14_pretrain.pth": None,
    "dinov2_vitb14_pretrain.pth": None,
    "dinov2_vitl14_pretrain.pth": None,
    "dinov2_vitg14_pretrain.pth": None,
}


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable or does not fit its model (one-line message)."""


class DownloadError(RuntimeError):
    """A checkpoint could not be fetched; the message says how to put it in place by hand."""


def _one_line(error: BaseException, limit: int = 160) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[:limit] + "..."


# ------------------------------------------------------------------ names, URLs, paths
def require_one_source(name: str, checkpoint: object, random_weights: bool) -> None:
    """Exactly one of checkpoint / random_weights=True: a model is never silently random."""
    flag = "--sam" if name in SAM_MODELS else "--dino"
    if checkpoint is not None and random_weights:
        raise ValueError(f"{name}: give either checkpoint=<path> or random_weights=True, not both")
    if checkpoint is None and not random_weights:
        raise ValueError(f"{name} needs checkpoint=<path to {checkpoint_filename(name)}> (python -m "
                         f"model.checkpoints {flag} {name} downloads it) or random_weights=True (tests)")


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
                              f"(python -m model.checkpoints downloads the official files)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError, ... for bad files
        raise CheckpointError(f"checkpoint {path} for {expected} is not a readable PyTorch file "
                              f"(truncated or corrupt?): {_one_line(e)}") from e


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
        raise CheckpointError(f"checkpoint {path} does not match {expected}: {_one_line(e)}") from e


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


# ------------------------------------------------------------------ download
def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_sha256(path: str | Path, expected: str) -> None:
    actual = sha256_file(path)
    if actual != expected.lower():
        raise CheckpointError(f"checkpoint {path} has sha256 {actual}, expected {expected.lower()}")


def _manual_hint(url: str, dest: Path) -> str:
    return (f"Download {url} on a machine with internet access and copy it to {dest} "
            f"(checkpoints are looked up in $MODEL_DIR/checkpoints, else ./checkpoints: set MODEL_DIR, "
            f"or pass the file's path explicitly)")


def download(name: str, dest_dir: str | Path, sha256: str | None = None, *, url: str | None = None,
             verify: bool = True, timeout: float = 30.0) -> Path:
    """Stream the official file of `name` into dest_dir (via a .part file, then os.replace).

    The sha256 (argument, else the SHA256 table) is checked when known; otherwise, with verify, the
    file must load strictly into its model before it is put in place.
    """
    filename = checkpoint_filename(name)
    url = url or checkpoint_url(name)
    dest = Path(dest_dir) / filename
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(filename + ".part")
    expected_sha = sha256 or SHA256.get(filename)
    try:
        try:
            with requests.get(url, stream=True, timeout=timeout) as response:
                response.raise_for_status()
                total = int(response.headers.get("content-length") or 0) or None
                with open(part, "wb") as f, tqdm(total=total, unit="B", unit_scale=True,
                                                 desc=filename, disable=None) as bar:
                    for chunk in response.iter_content(chunk_size=1 << 20):
                        f.write(chunk)
                        bar.update(len(chunk))
        except requests.RequestException as e:
            raise DownloadError(f"cannot download {name} from {url}: {_one_line(e, 200)}. "
                                f"{_manual_hint(url, dest)}") from e
        if expected_sha:
            verify_sha256(part, expected_sha)
        elif verify:
            verify_loads(name, part)
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m model.checkpoints",
        description="Download the official SAM2 and DINOv2 checkpoints that are missing.")
    sam_models, dino_models = SAM_MODELS, DINO_MODELS
    parser.add_argument("--sam", default="sam2-l", choices=[*sam_models, "none"],
                        help="SAM2 model (default: sam2-l, the method's headline model)")
    parser.add_argument("--dino", default="dinov2-l", choices=[*dino_models, "none"],
                        help="DINOv2 model (default: dinov2-l)")
    parser.add_argument("--dir", type=Path, default=None,
                        help="target folder (default: $MODEL_DIR/checkpoints, else ./checkpoints)")
    args = parser.parse_args(argv)
    dest_dir = args.dir or default_checkpoint_dir()
    status = 0
    for name in (args.sam, args.dino):
        if name == "none":
            continue
        dest = dest_dir / checkpoint_filename(name)
        if dest.is_file() and dest.stat().st_size > 0:
            print(f"{name}: {dest} already present")
            continue
        print(f"{name}: downloading {checkpoint_url(name)} -> {dest}")
        try:
            download(name, dest_dir)
        except (DownloadError, CheckpointError) as e:
            print(f"error: {e}", file=sys.stderr)
            status = 1
            continue
        print(f"{name}: {dest} ok")
    return status


if __name__ == "__main__":
    sys.exit(main())
