"""Command-line options the model benchmarks share (which models, at which sizes, on which image)."""
from __future__ import annotations

import argparse


def add_model_args(ap: argparse.ArgumentParser, *, sam: str, sam_image_size: int, dino_image_size: int,
                   points_per_side: int, image_size: str, points_help: str | None = None) -> None:
    """--sam, --dino, --sam-image-size, --dino-image-size, --points-per-side and --image-size (HxW of
    the synthetic images), with this benchmark's defaults."""
    ap.add_argument("--sam", default=sam)
    ap.add_argument("--dino", default="dinov2-s")
    ap.add_argument("--sam-image-size", type=int, default=sam_image_size)
    ap.add_argument("--dino-image-size", type=int, default=dino_image_size)
    ap.add_argument("--points-per-side", type=int, default=points_per_side, help=points_help)
    ap.add_argument("--image-size", default=image_size, help="HxW of the synthetic images")
