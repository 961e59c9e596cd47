"""Patch embedding: cut an image into non-overlapping square patches and project each to a token."""

from __future__ import annotations

import torch
from torch import nn


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` patches -> linear tokens via a strided convolution.

    Parameter names (``proj.weight``, ``proj.bias``) follow the DINO/timm ViT layout.
    Any module with the same two methods (``forward`` and ``grid_shape``) can replace it
    inside :class:`~gigaslide.models.layers.vit.VisionTransformer` (e.g. a linear embedding
    of a grid of pre-extracted features for a region-level ViT).
    """

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 384) -> None:
        super().__init__()
        self.patch_size = int(patch_size)
        self.in_chans = int(in_chans)
        self.embed_dim = int(embed_dim)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def grid_shape(self, x: torch.Tensor) -> tuple[int, int]:
        """Token grid (rows, cols) for an input (B, C, H, W); H and W must be multiples of the patch size."""
        if x.ndim != 4:
            raise ValueError(f"PatchEmbed expects a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
        _, c, h, w = x.shape
        if c != self.in_chans:
            raise ValueError(f"PatchEmbed expects {self.in_chans} input channels, got {c}")
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(
                f"input size {h}x{w} is not a multiple of the patch size {p}; "
                f"resize or crop tiles to a multiple of {p} pixels"
            )
        return h // p, w // p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, D) with N = (H / p) * (W / p), row-major over the grid."""
        self.grid_shape(x)  # validates the input
        x = self.proj(x)  # (B, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (B, N, D)
