"""LongNet encoder: pre-norm Transformer layers with dilated attention (torchscale's layout).

One layer (names as in torchscale, so LongViT and Prov-GigaPath weights load by key)::

    x = x + drop_path(self_attn(self_attn_layer_norm(x)))          # DilatedAttention, with inner_attn_ln
    x = x + drop_path(ffn(final_layer_norm(x)))                    # fc1 -> GELU -> ffn_layernorm -> fc2

The "sub-LayerNorms" (``self_attn.inner_attn_ln``, ``ffn.ffn_layernorm``) are torchscale's default
(``subln=True``). ``LongNetEncoder(..., normalize_output=True)`` adds a final ``layer_norm``
(Prov-GigaPath has it, LongViT does not). Drop path grows linearly from 0 to ``drop_path_rate``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from gigaslide.models.layers.dilated_attention import DilatedAttention
from gigaslide.models.layers.mlp import DropPath


class LongNetFFN(nn.Module):
    """fc1 -> GELU (computed in float32) -> dropout -> optional ``ffn_layernorm`` -> fc2 -> dropout."""

    def __init__(
        self, dim: int, hidden: int, dropout: float = 0.0, subln: bool = True, eps: float = 1e-5
    ) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.ffn_layernorm = nn.LayerNorm(hidden, eps=eps) if subln else None
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """(..., D) -> (..., D)."""
        h = self.fc1(x)
        h = F.gelu(h.float()).type_as(h)
        h = self.dropout(h)
        if self.ffn_layernorm is not None:
            h = self.ffn_layernorm(h)
        return self.dropout(self.fc2(h))


class LongNetLayer(nn.Module):
    """One pre-norm LongNet layer over (B, N, D)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn_dim: int,
        segment_lengths: Sequence[int],
        dilated_ratios: Sequence[int],
        drop_path: float = 0.0,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        eps: float = 1e-5,
        subln: bool = True,
    ) -> None:
        super().__init__()
        self.self_attn = DilatedAttention(
            dim,
            num_heads,
            segment_lengths,
            dilated_ratios,
            dropout=attn_dropout,
            inner_norm=subln,
            layernorm_eps=eps,
        )
        self.self_attn_layer_norm = nn.LayerNorm(dim, eps=eps)
        self.ffn = LongNetFFN(dim, ffn_dim, dropout=dropout, subln=subln, eps=eps)
        self.final_layer_norm = nn.LayerNorm(dim, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """(B, N, D) -> (B, N, D); ``key_padding_mask`` (B, N) True = padding."""
        y = self.self_attn(self.self_attn_layer_norm(x), key_padding_mask=key_padding_mask)
        x = x + self.drop_path(self.dropout(y))
        return x + self.drop_path(self.ffn(self.final_layer_norm(x)))


class LongNetEncoder(nn.Module):
    """A stack of :class:`LongNetLayer` (``layers.{i}``) with optional activation checkpointing.

    forward(x (B, N, D), key_padding_mask (B, N) True = padding) -> (B, N, D). Padded tokens are
    zeroed on entry, as torchscale's encoder does.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        ffn_dim: int,
        segment_lengths: Sequence[int],
        dilated_ratios: Sequence[int],
        drop_path_rate: float = 0.0,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        eps: float = 1e-5,
        subln: bool = True,
        normalize_output: bool = False,
        checkpoint_activations: bool = False,
    ) -> None:
        super().__init__()
        rates = [drop_path_rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]
        self.layers = nn.ModuleList(
            LongNetLayer(
                dim,
                num_heads,
                ffn_dim,
                segment_lengths,
                dilated_ratios,
                rates[i],
                dropout,
                attn_dropout,
                eps,
                subln,
            )
            for i in range(depth)
        )
        self.layer_norm = nn.LayerNorm(dim, eps=eps) if normalize_output else None
        self.checkpoint_activations = bool(checkpoint_activations)

    def set_schedule(self, segment_lengths: Sequence[int], dilated_ratios: Sequence[int]) -> None:
        """Change every layer's (w, r) schedule."""
        for layer in self.layers:
            layer.self_attn.set_schedule(segment_lengths, dilated_ratios)

    def set_sequence_parallel(self, enabled: bool = True, group: dist.ProcessGroup | None = None) -> None:
        """Every layer treats its input as this rank's chunk of a sequence split over ``group``."""
        for layer in self.layers:
            layer.self_attn.set_sequence_parallel(enabled, group)

    def forward(
        self, x: Tensor, key_padding_mask: Tensor | None = None, return_all: bool = False
    ) -> Tensor | list[Tensor]:
        """(B, N, D) -> (B, N, D), or the list of every layer's output when ``return_all``."""
        if key_padding_mask is not None:
            x = x.masked_fill(key_padding_mask.unsqueeze(-1).to(torch.bool), 0.0)
        states = []
        for layer in self.layers:
            if self.checkpoint_activations and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, key_padding_mask, use_reentrant=False)
            else:
                x = layer(x, key_padding_mask)
            states.append(x)
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        return states if return_all else x
