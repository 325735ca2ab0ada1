#!/usr/bin/env python3
"""Download the official SAM2 and DINOv2 checkpoint files that are missing.

    python scripts/download_checkpoints.py --sam sam2-l --dino dinov2-l [--dir D]

The networking lives here, outside the method package: model/ only loads files (strictly). A
downloaded file goes to a .part file first and is put in place only after it loaded strictly into
its model (or matched a sha256 given with --sha256), so a torn or wrong download never sits
where the backend looks for checkpoints. Used by scripts/run_backend.sh and docker/Dockerfile.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path

import requests
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.catalog import DINO_MODELS, SAM_MODELS, checkpoint_filename, checkpoint_url  # noqa: E402
from model.checkpoints import CheckpointError, default_checkpoint_dir, one_line, verify_loads  # noqa: E402


class DownloadError(RuntimeError):
    """A checkpoint could not be fetched; the message says how to put it in place by hand."""


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
             timeout: float = 30.0) -> Path:
    """Stream the official file of `name` into dest_dir (via a .part file, then os.replace).

    With `sha256` the file must have that digest; without, it must load strictly into its model.
    """
    filename = checkpoint_filename(name)
    url = url or checkpoint_url(name)
    dest = Path(dest_dir) / filename
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(filename + ".part")
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
            raise DownloadError(f"cannot download {name} from {url}: {one_line(e, 200)}. "
                                f"{_manual_hint(url, dest)}") from e
        if sha256:
            verify_sha256(part, sha256)
        else:
            verify_loads(name, part)
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/download_checkpoints.py",
        description="Download the official SAM2 and DINOv2 checkpoints that are missing.")
    parser.add_argument("--sam", default="sam2-l", choices=[*SAM_MODELS, "none"],
                        help="SAM2 model (default: sam2-l, the method's headline model)")
    parser.add_argument("--dino", default="dinov2-l", choices=[*DINO_MODELS, "none"],
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
