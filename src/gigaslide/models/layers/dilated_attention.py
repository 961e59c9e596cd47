"""LongNet dilated attention (Ding et al. 2023), the attention of LongViT and Prov-GigaPath's slide encoder.

For every (segment length w_i, dilation r_i) pair the sequence is cut into segments of ``min(w_i, N)``
tokens; inside each segment head ``h`` keeps every ``r_i``-th token starting at offset
``h // ceil(H / r_i)`` (the heads form ``r_i`` contiguous groups, group j taking offset j, as in
LongNet's reference code, so public checkpoints behave the same). Exact attention runs inside each
sparsified segment; each pair's output is scattered back and the pairs are mixed per token and head
by their softmax denominators (weights ``softmax_i(lse_i)``), with gradients through the weights.
Cost is linear in N for a fixed schedule.

    attn = DilatedAttention(384, 16, segment_lengths=(64, 128, 256, 512, 1024), dilated_ratios=(1, 2, 4, 8, 16))
    y = attn(x, key_padding_mask=None)     # x (B, N, D) -> (B, N, D); mask (B, N) bool, True = padding

Parameter names follow torchscale (``q_proj``, ``k_proj``, ``v_proj``, ``inner_attn_ln``, ``out_proj``).
Differences from the reference, by design: the reference mixes with detached weights (wrong
gradients) and lets the zero vectors that pad a sequence to whole segments act as keys; here padded
positions are masked out (``reference_padding=True`` restores the reference's zero keys, which only
matters when N is not a multiple of a segment length) and ``key_padding_mask`` is honoured (the
reference's fused path ignores it).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gigaslide.models.layers.dilated_kernels import DilatedMixFunction, default_scale, dilated_attention_math
from gigaslide.models.layers.dilated_parallel import SeqParallelDilatedMix

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "fused", "math")


def check_schedule(
    segment_lengths: Sequence[int], dilated_ratios: Sequence[int]
) -> tuple[tuple[int, int], ...]:
    """Validate a (segment lengths, dilation ratios) schedule and return its (w, r) pairs."""
    seg, rat = [int(s) for s in segment_lengths], [int(r) for r in dilated_ratios]
    if not seg or len(seg) != len(rat):
        raise ValueError(
            f"segment_lengths {seg} and dilated_ratios {rat} must be non-empty and of equal length "
            "(one dilation ratio per segment length)"
        )
    bad = [(s, r) for s, r in zip(seg, rat, strict=True) if s < 1 or r < 1]
    if bad:
        raise ValueError(f"segment lengths and dilation ratios must be >= 1, got pairs {bad}")
    return tuple(zip(seg, rat, strict=True))


class DilatedAttention(nn.Module):
    """Multi-head dilated self-attention over (B, N, D) sequences.

    Args:
        embed_dim: model width D (divisible by ``num_heads``).
        num_heads: number of heads H (any number; heads that do not fill a group evenly are handled
            as the reference does).
        segment_lengths / dilated_ratios: the schedule, one ratio per segment length.
        dropout: attention-probability dropout (training only; uses the ``math`` backend).
        bias: biases on the four projections.
        inner_norm: torchscale's "sub-LayerNorm" ``inner_attn_ln`` before ``out_proj`` (LongViT and
            Prov-GigaPath have it).
        layernorm_eps: its epsilon (torchscale default 1e-5).
        backend: ``fused`` (ATen attention kernels that return the log-sum-exp; CPU and CUDA), ``math``
            (explicit per-segment scores, any device) or ``auto`` (fused where available).
        reference_padding: treat the zero vectors padding N to whole segments as keys, as the
            reference does (for bit-faithful outputs of public checkpoints on such lengths).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        segment_lengths: Sequence[int],
        dilated_ratios: Sequence[int],
        dropout: float = 0.0,
        bias: bool = True,
        inner_norm: bool = True,
        layernorm_eps: float = 1e-5,
        backend: str = "auto",
        reference_padding: bool = False,
    ) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.embed_dim, self.num_heads = int(embed_dim), int(num_heads)
        self.head_dim = embed_dim // num_heads
        self.pairs = check_schedule(segment_lengths, dilated_ratios)
        self.dropout = float(dropout)
        self.backend = backend
        self.reference_padding = bool(reference_padding)
        self.scale = default_scale(self.head_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.inner_attn_ln = nn.LayerNorm(embed_dim, eps=layernorm_eps) if inner_norm else None
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.sequence_parallel = False
        self.seq_group: dist.ProcessGroup | None = None

    @property
    def segment_lengths(self) -> tuple[int, ...]:
        return tuple(w for w, _ in self.pairs)

    @property
    def dilated_ratios(self) -> tuple[int, ...]:
        return tuple(r for _, r in self.pairs)

    def set_schedule(self, segment_lengths: Sequence[int], dilated_ratios: Sequence[int]) -> None:
        """Change the (w, r) schedule (e.g. finetuning at another input size); weights are unaffected."""
        self.pairs = check_schedule(segment_lengths, dilated_ratios)

    def set_sequence_parallel(self, enabled: bool = True, group: dist.ProcessGroup | None = None) -> None:
        """Treat the input as this rank's contiguous chunk of a sequence split over ``group`` (LongNet)."""
        self.sequence_parallel, self.seq_group = bool(enabled), group

    def _parallel_active(self) -> bool:
        return (
            self.sequence_parallel
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size(self.seq_group) > 1
        )

    def _use_fused(self, device: torch.device) -> bool:
        if self.backend == "math" or (self.training and self.dropout > 0.0):
            return False
        if device.type in ("cpu", "cuda"):
            return True
        if self.backend == "fused":
            raise RuntimeError(
                f"DilatedAttention: no fused kernel for device {device.type!r}; use backend='math'"
            )
        return False

    def attend(self, q: Tensor, k: Tensor, v: Tensor, key_valid: Tensor | None) -> Tensor:
        """The mixture of all pairs on projected heads: q, k, v (B, N, H, d) -> (B, N, H, d)."""
        if self._parallel_active():
            if self.training and self.dropout > 0.0:
                raise ValueError("sequence-parallel DilatedAttention does not support attention dropout")
            args = (self.pairs, self.reference_padding, self.scale, self.seq_group)
            return SeqParallelDilatedMix.apply(q, k, v, key_valid, *args)
        if self._use_fused(q.device):
            return DilatedMixFunction.apply(
                q, k, v, key_valid, self.pairs, self.reference_padding, self.scale
            )
        p = self.dropout if self.training else 0.0
        return dilated_attention_math(q, k, v, key_valid, self.pairs, self.reference_padding, self.scale, p)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """(B, N, D) -> (B, N, D); ``key_padding_mask`` (B, N) bool, True marks padding (never attended)."""
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"DilatedAttention expects (B, N, {self.embed_dim}) input, got {tuple(x.shape)}")
        b, n, _ = x.shape
        key_valid = None
        if key_padding_mask is not None:
            if key_padding_mask.shape != (b, n):
                raise ValueError(
                    f"key_padding_mask must have shape (B, N) = {(b, n)}, got {tuple(key_padding_mask.shape)}"
                )
            key_valid = ~key_padding_mask.to(torch.bool)
        shape = (b, n, self.num_heads, self.head_dim)
        q = self.q_proj(x).reshape(shape)
        k = self.k_proj(x).reshape(shape)
        v = self.v_proj(x).reshape(shape)
        out = self.attend(q, k, v, key_valid).reshape(b, n, self.embed_dim)  # (B, N, D)
        if self.inner_attn_ln is not None:
            out = self.inner_attn_ln(out)
        return self.out_proj(out)

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, pairs={self.pairs}, backend={self.backend}"
