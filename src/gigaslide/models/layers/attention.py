"""Multi-head self-attention that can hand back its attention maps (for heatmaps)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection (DINO/timm parameter names).

    ``forward(x)`` uses PyTorch's fused scaled-dot-product kernel. ``forward(x, return_attention=True)``
    computes the softmax weights explicitly and returns them too, shape (B, heads, N, N).
    ``key_mask`` (B, N) bool (True = token takes part) hides padded tokens from every query; each
    row must keep at least one True entry.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embedding dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = int(num_heads)
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self, x: torch.Tensor, return_attention: bool = False, key_mask: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(B, N, D) -> (B, N, D), plus the (B, heads, N, N) attention weights when asked."""
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        bias = None if key_mask is None else key_mask[:, None, None, :].to(torch.bool)  # (B, 1, 1, N)
        attn: torch.Tensor | None = None
        if return_attention:
            attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, heads, N, N)
            if bias is not None:
                attn = attn.masked_fill(~bias, float("-inf"))
            attn = attn.softmax(dim=-1)
            out = self.attn_drop(attn) @ v  # (B, heads, N, head_dim)
        else:
            p = self.attn_drop.p if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)
        out = out.transpose(1, 2).reshape(b, n, d)  # (B, N, D)
        out = self.proj_drop(self.proj(out))
        if return_attention:
            assert attn is not None
            return out, attn
        return out

    def forward_query(
        self, x: torch.Tensor, n_query: int = 1, key_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, N, D) -> (B, n_query, D): the output rows of the first ``n_query`` tokens only.

        Equal to ``forward(x)[:, :n_query]`` (keys and values still come from all N tokens), at the
        cost of the key/value projections alone for the other tokens: what a CLS embedding needs
        from the last block. Attention dropout is applied as in :meth:`forward`.
        """
        b, n, d = x.shape
        w, bias_qkv = self.qkv.weight, self.qkv.bias  # (3D, D), (3D,): rows q | k | v
        q = F.linear(x[:, :n_query], w[:d], None if bias_qkv is None else bias_qkv[:d])  # (B, n_query, D)
        kv = F.linear(x, w[d:], None if bias_qkv is None else bias_qkv[d:])  # (B, N, 2D)
        q = q.reshape(b, n_query, self.num_heads, self.head_dim).transpose(1, 2)  # (B, heads, n_query, hd)
        k, v = kv.reshape(b, n, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        mask = None if key_mask is None else key_mask[:, None, None, :].to(torch.bool)  # (B, 1, 1, N)
        p = self.attn_drop.p if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, heads, n_query, hd)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n_query, d)))
