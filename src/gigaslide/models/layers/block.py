"""Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

from __future__ import annotations

import torch
from torch import nn

from gigaslide.models.layers.attention import Attention
from gigaslide.models.layers.mlp import DropPath, Mlp


class Block(nn.Module):
    """One ViT encoder block (names ``norm1``, ``attn``, ``norm2``, ``mlp`` as in DINO/timm)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(
            dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop
        )
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), drop=drop)

    def forward(
        self, x: torch.Tensor, return_attention: bool = False, key_mask: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(B, N, D) -> (B, N, D); with ``return_attention`` also the (B, heads, N, N) weights.

        ``key_mask`` (B, N) bool hides padded tokens (False) from the attention of every token.
        """
        if return_attention:
            y, attn = self.attn(self.norm1(x), return_attention=True, key_mask=key_mask)
        else:
            y, attn = self.attn(self.norm1(x), key_mask=key_mask), None
        x = x + self.drop_path(y)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        if return_attention:
            return x, attn
        return x

    def forward_query(
        self, x: torch.Tensor, n_query: int = 1, key_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, N, D) -> (B, n_query, D): ``forward(x)[:, :n_query]`` without the other rows' MLP.

        For the last block of a network whose output is its CLS token this skips about 10/12 of
        the block's multiply-adds (all but the key/value projections of the other tokens).
        """
        y = self.attn.forward_query(self.norm1(x), n_query=n_query, key_mask=key_mask)
        h = x[:, :n_query] + self.drop_path(y)
        return h + self.drop_path(self.mlp(self.norm2(h)))


def block_stack(
    depth: int,
    dim: int,
    num_heads: int,
    mlp_ratio: float = 4.0,
    qkv_bias: bool = True,
    drop: float = 0.0,
    attn_drop: float = 0.0,
    drop_path_rate: float = 0.0,
    norm_eps: float = 1e-6,
) -> nn.ModuleList:
    """``depth`` blocks with stochastic depth rising linearly from 0 to ``drop_path_rate`` (DINO/timm)."""
    rates = torch.linspace(0.0, drop_path_rate, depth).tolist() if depth > 0 else []
    return nn.ModuleList(
        Block(dim, num_heads, mlp_ratio, qkv_bias, drop, attn_drop, drop_path=rate, norm_eps=norm_eps)
        for rate in rates
    )
