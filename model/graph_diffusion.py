"""Graph-diffusion rescoring (FSOD-VFM), a named alternative to the method's soft merge
(docs/method.md, "Graph diffusion").

Per label, over the candidates of that label in rank order: A[i, j] = |M_i ∩ M_j| / |M_i| for
earlier masks j < i (0 elsewhere), personalisation p_i = max_j A[i, j], and a personalised walk
r <- alpha · P r + (1 - alpha) · p from r = 1/n, at most `steps` times, stopping once the change
has L2 norm below `tol`. The released code uses P = A (its row normalisation divides by a boolean):
that is `normalise=False`; `normalise=True` divides each non-zero row by its sum. Scores then
decay as s · max(0, 1 - r) ** lam. Masks are compared at the DINOv2 feature resolution
(`feature_masks`).
"""
from __future__ import annotations

import torch

DINO_PATCH = 14                     # DINOv2 patch side: the feature grid is dino_image_size // 14


def feature_masks(lowres: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Binary low-res masks [n, h, w] -> binary masks [n, *size] at the feature grid.

    As the release resizes its binary masks to the feature map (OpenCV bilinear, > 0.5), here the
    low-res SAM2 masks, which share the DINOv2 input's square frame. Bilinear sampling without
    antialias reads two rows and two columns per output pixel: only those are gathered and made
    float (converting whole masks would cost more than the rest of the rescoring).
    """
    (y0, y1, wy), (x0, x1, wx) = (_taps(lowres.shape[1], size[0], lowres.device),
                                  _taps(lowres.shape[2], size[1], lowres.device))
    H, W = size
    v = lowres.index_select(1, torch.cat([y0, y1])).index_select(2, torch.cat([x0, x1])).float()
    top = (1 - wx) * v[:, :H, :W] + wx * v[:, :H, W:]
    bottom = (1 - wx) * v[:, H:, :W] + wx * v[:, H:, W:]
    return ((1 - wy)[:, None] * top + wy[:, None] * bottom) > 0.5


def _taps(n_in: int, n_out: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices (i0, i1) and weight of i1 of a bilinear resize, align_corners=False."""
    src = ((torch.arange(n_out, dtype=torch.float32, device=device) + 0.5) * (n_in / n_out) - 0.5).clamp(min=0)
    i0 = src.long().clamp(max=n_in - 1)
    return i0, (i0 + 1).clamp(max=n_in - 1), (src - i0).clamp(0, 1)


def graph_diffusion(masks: torch.Tensor, labels: torch.Tensor, alpha: float = 0.3, steps: int = 30,
                    normalise: bool = False, tol: float = 1e-6) -> torch.Tensor:
    """Diffused overlap r [n] (float32) of binary masks [n, ...] in rank order with labels [n].

    All labels iterate together (the matrix is zero across labels); each label stops on its own
    change norm, so the result equals running the labels one by one. n == 1 gives r = 0.
    """
    n = masks.shape[0]
    r = torch.zeros(n, dtype=torch.float32, device=masks.device)
    if n <= 1:
        return r
    flat = masks.reshape(n, -1).float()
    _, group = torch.unique(labels, return_inverse=True)
    same = group[:, None] == group[None, :]
    inter = torch.tril(flat @ flat.T, diagonal=-1) * same        # earlier masks of the same label only
    a = inter / flat.sum(1).clamp(min=1e-6)[:, None]
    p = a.amax(1)
    if normalise:
        rows = a.sum(1, keepdim=True)
        a = torch.where(rows > 1e-10, a / rows.clamp(min=1e-10), a)
    counts = torch.bincount(group).float()
    r = 1.0 / counts[group]
    running = torch.ones_like(counts, dtype=torch.bool)
    for _ in range(steps):
        step = alpha * (a @ r) + (1 - alpha) * p
        change = torch.zeros_like(counts).index_add_(0, group, (step - r) ** 2).sqrt()
        r = torch.where(running[group], step, r)
        running &= change >= tol
        if not running.any():
            break
    return r


def diffusion_decay(scores: torch.Tensor, r: torch.Tensor, lam: float = 0.5) -> torch.Tensor:
    """New scores s · max(0, 1 - r) ** lam."""
    return scores * (1 - r).clamp(min=0) ** lam
