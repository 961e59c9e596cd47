"""HIPT ViT_4096-256: the region-level transformer over a grid of ViT_256 CLS tokens (Chen et al., CVPR 2022).

A 4096 px region at 20x is cut into a 16x16 grid of 256 px patches; ViT_256 turns each into a
384-d CLS token, and ViT_4096 reads the (B, 384, 16, 16) grid as an image whose "pixels" are
already tokens. Architecture (paper section 3.2 and the public ``vit4k_xs``):

    phi = Linear(384 -> 192) + GELU + Dropout          token embedding (no convolution)
    [CLS] + learned position embeddings                 14x14 table (stage-2 DINO global crops),
                                                        interpolated to the input grid
    6 pre-norm blocks, 6 heads, width 192, MLP 4x, qkv bias, LayerNorm eps 1e-6
    output: final-normalised CLS token (B, 192)

The position table is interpolated at every forward pass exactly as the official code does
(bicubic, ``scale_factor = (n + 0.1) / 14``; the table itself when the grid is 14x14), so any grid
size works: 16x16 for full regions, 6x6 for DINO local crops. Parameter names (``cls_token``,
``pos_embed``, ``phi.0``, ``blocks.N...``, ``norm``) follow the public ``vit4k_xs_dino.pth``, whose
``teacher`` entry holds them under ``backbone.`` beside the DINO ``head.``; ``load_weights`` strips
the prefix and drops the head, then loads strictly.

Padded patches (the part of an edge region outside the slide) can be hidden with a patch mask:
they are then left out of every attention, so they cannot change the region token. With every
patch valid (or no mask) the output is the official one.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

from gigaslide.models.layers.block import block_stack
from gigaslide.models.layers.pos_embed import resize_pos_embed
from gigaslide.models.layers.vit import init_vit_weights

logger = logging.getLogger(__name__)


class HIPTViT4K(nn.Module):
    """ViT_4096-256 (``vit4k_xs``): (B, in_dim, H, W) token grid -> (B, embed_dim) region CLS token."""

    num_prefix_tokens = 1
    #: DINO checkpoints carry the projection head next to the backbone; it is not part of the model
    checkpoint_drop_prefixes = ("head.",)

    def __init__(
        self,
        in_dim: int = 384,
        embed_dim: int = 192,
        depth: int = 6,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        grid: int = 14,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.in_dim = int(in_dim)
        self.embed_dim = self.num_features = int(embed_dim)
        self.grid = (int(grid), int(grid))
        self.phi = nn.Sequential(nn.Linear(in_dim, embed_dim), nn.GELU(), nn.Dropout(drop_rate))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        self.blocks = block_stack(
            depth, embed_dim, num_heads, mlp_ratio, True, drop_rate, attn_drop_rate, drop_path_rate, norm_eps
        )
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Truncated-normal (std 0.02) tokens and linear weights, zero biases, unit LayerNorms."""
        init_vit_weights(self)

    def interpolate_pos_encoding(self, grid: tuple[int, int]) -> torch.Tensor:
        """Position embeddings (1, 1 + rows*cols, D) for a token grid, resized from the 14x14 table."""
        return resize_pos_embed(self.pos_embed, grid, self.num_prefix_tokens, old_grid=self.grid)

    def key_mask(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
        """Validate a (B, in_dim, H, W) grid; returns the (B, 1 + H*W) attention key mask (None = all)."""
        if x.ndim != 4 or x.shape[1] != self.in_dim:
            raise ValueError(
                f"HIPTViT4K expects a (B, {self.in_dim}, H, W) grid of ViT_256 tokens, got {tuple(x.shape)}; "
                "reshape region tokens (B, H*W, D) with .transpose(1, 2).reshape(B, D, H, W)"
            )
        if mask is None:
            return None
        b, _, h, w = x.shape
        if tuple(mask.shape) != (b, h, w):
            raise ValueError(
                f"HIPTViT4K: patch mask must have shape (B, H, W)={(b, h, w)}, got {tuple(mask.shape)}"
            )
        cls = torch.ones(b, 1, dtype=torch.bool, device=x.device)
        return torch.cat([cls, mask.to(device=x.device, dtype=torch.bool).flatten(1)], dim=1)  # (B, 1 + H*W)

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_dim, H, W) -> (B, 1 + H*W, D): embedded tokens (row-major), CLS first, positions added."""
        b, _, h, w = x.shape
        tokens = self.phi(x.flatten(2).transpose(1, 2))  # (B, H*W, D)
        cls = self.cls_token.expand(b, -1, -1)  # (B, 1, D)
        tokens = torch.cat([cls, tokens], dim=1)  # (B, 1 + H*W, D)
        tokens = tokens + self.interpolate_pos_encoding((h, w))
        return self.pos_drop(tokens)

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, in_dim, H, W) [+ (B, H, W) bool patch mask] -> (B, 1 + H*W, D) final-normalised tokens."""
        key_mask = self.key_mask(x, mask)
        t = self.prepare_tokens(x)
        for blk in self.blocks:
            t = blk(t, key_mask=key_mask)
        return self.norm(t)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, in_dim, H, W) [+ (B, H, W) bool patch mask] -> (B, D) region CLS token.

        In eval mode the last block computes the CLS row only, as in ``VisionTransformer.forward``.
        """
        if self.training or not len(self.blocks):
            return self.forward_features(x, mask)[:, 0]
        key_mask = self.key_mask(x, mask)
        t = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            t = blk(t, key_mask=key_mask)
        return self.norm(self.blocks[-1].forward_query(t, n_query=1, key_mask=key_mask))[:, 0]  # (B, D)

    def get_last_selfattention(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, in_dim, H, W) -> (B, heads, 1 + H*W, 1 + H*W) softmax attention of the last block."""
        key_mask = self.key_mask(x, mask)
        t = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            t = blk(t, key_mask=key_mask)
        _, attn = self.blocks[-1](t, return_attention=True, key_mask=key_mask)
        return attn


def create_hipt_vit4k(
    weights: str | os.PathLike[str] | None = None, strict: bool = True, **kw: Any
) -> HIPTViT4K:
    """Build ViT_4096-256, optionally loading a local checkpoint (``vit4k_xs_dino.pth`` layout).

    ``weights=None`` gives random initialisation, recorded as ``weights_info == {"random_init": True}``.
    Loads are strict: any missing or unexpected key raises, naming the keys.
    """
    from gigaslide.models.weights import load_weights

    model = HIPTViT4K(**kw)
    if weights is None:
        logger.warning(
            "HIPT ViT_4096 uses RANDOM weights (no weights given): region tokens are meaningless until "
            "it is trained; pass weights=<vit4k_xs_dino.pth>"
        )
        model.weights_info = {"random_init": True}
    else:
        info = load_weights(model, weights, strict=strict)
        info["random_init"] = False
        model.weights_info = info
    return model
