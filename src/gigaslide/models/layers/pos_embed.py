"""Resizing learned absolute position embeddings to another token grid.

The grid part of the embedding is resampled bicubically while the prefix slots (the CLS
token) are kept as they are. The resampling reproduces DINO's ``interpolate_pos_encoding``,
which HIPT uses at every forward pass: ``F.interpolate`` with
``scale_factor = (new + 0.1) / old`` (the 0.1 guards against the output size rounding down).
Using the same formula both when a checkpoint is loaded and at forward time means a model
loaded from a 14x14-grid DINO checkpoint gives the same features as the original code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def infer_square_grid(n_tokens: int) -> int:
    """Side of a square grid holding ``n_tokens`` tokens; raises when ``n_tokens`` is not a square."""
    side = math.isqrt(int(n_tokens))
    if side * side != n_tokens:
        raise ValueError(
            f"cannot infer a square token grid from {n_tokens} position embeddings; pass old_grid explicitly"
        )
    return side


def resize_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: tuple[int, int],
    num_prefix_tokens: int = 1,
    old_grid: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Resample (1, P + h*w, D) position embeddings to (1, P + H*W, D) for ``new_grid`` = (H, W).

    ``P = num_prefix_tokens`` leading slots (CLS) are copied unchanged. ``old_grid`` defaults to
    a square grid. Returns ``pos_embed`` itself when the grid already matches. Differentiable.
    """
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must have shape (1, N, D), got {tuple(pos_embed.shape)}")
    n_grid = pos_embed.shape[1] - num_prefix_tokens
    if old_grid is None:
        side = infer_square_grid(n_grid)
        old_grid = (side, side)
    oh, ow = int(old_grid[0]), int(old_grid[1])
    nh, nw = int(new_grid[0]), int(new_grid[1])
    if oh * ow != n_grid:
        raise ValueError(f"old_grid {oh}x{ow} does not match {n_grid} grid position embeddings")
    if (oh, ow) == (nh, nw):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = pos_embed.shape[-1]
    grid = grid.reshape(1, oh, ow, dim).permute(0, 3, 1, 2)  # (1, D, h, w)
    scale = ((nh + 0.1) / oh, (nw + 0.1) / ow)
    orig_dtype = grid.dtype
    grid = F.interpolate(grid.float(), scale_factor=scale, mode="bicubic", align_corners=False)
    if grid.shape[-2:] != (nh, nw):  # pragma: no cover - the 0.1 offset prevents this
        raise RuntimeError(f"position embedding resize produced {tuple(grid.shape[-2:])}, wanted {(nh, nw)}")
    grid = grid.to(orig_dtype).permute(0, 2, 3, 1).reshape(1, nh * nw, dim)  # (1, H*W, D)
    return torch.cat([prefix, grid], dim=1)
