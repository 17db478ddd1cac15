"""The same random geometric augmentation of two images: ELatentLPIPS' ensembling, and the feature nets' training."""
from __future__ import annotations

from typing import Optional

import torch


def random_flip_translate(batch: int, height: int, width: int, max_shift: int, flip: bool,
                           generator, device):
    """Per-sample source row/column indices [B, H], [B, W] of a random x-flip and integer shift
    (edges replicated)."""
    rows = torch.arange(height, device=device).expand(batch, height)
    cols = torch.arange(width, device=device).expand(batch, width)
    if max_shift > 0:
        shift = torch.randint(-max_shift, max_shift + 1, (2, batch, 1), generator=generator, device=device)
        rows = (rows - shift[0]).clamp(0, height - 1)
        cols = (cols - shift[1]).clamp(0, width - 1)
    if flip:
        flipped = torch.rand(batch, 1, generator=generator, device=device) < 0.5
        cols = torch.where(flipped, width - 1 - cols, cols)
    return rows, cols


def gather_pixels(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """x[b, c, rows[b, i], cols[b, j]]: each sample resampled along its own row and column indices."""
    B, C, H, W = x.shape
    x = x.gather(2, rows[:, None, :, None].expand(B, C, H, W))
    return x.gather(3, cols[:, None, None, :].expand(B, C, H, W))


def augment_pair(x: torch.Tensor, y: torch.Tensor, generator: Optional[torch.Generator] = None,
                 max_shift_fraction: float = 0.125, flip: bool = True):
    """The same random x-flip and translation (up to ±fraction·size, edges replicated) applied to x and y.

    This is the ensembling of ELatentLPIPS: docs/method.md §7 asks for "the same random augmentation" on both inputs
    without naming it; flips and integer translations are the geometric part of the published E-LatentLPIPS
    ensemble. Its other augmentations (scaling, rotation, colour, cutout) are not implemented here.
    """
    B, _, H, W = x.shape
    max_shift = int(max_shift_fraction * min(H, W))
    rows, cols = random_flip_translate(B, H, W, max_shift, flip, generator, x.device)
    return gather_pixels(x, rows, cols), gather_pixels(y, rows, cols)
