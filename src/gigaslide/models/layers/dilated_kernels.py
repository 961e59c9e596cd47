"""Sparsify / densify and attention-with-log-sum-exp kernels behind :class:`DilatedAttention`.

LongNet's dilated attention runs exact attention inside many small "sparsified segments" and mixes
the results of several (segment length w, dilation r) pairs by their softmax denominators. Mixing
needs each segment's log-sum-exp (LSE) of the attention scores, which the public
``F.scaled_dot_product_attention`` does not return. The fused path therefore calls the same ATen
kernels SDPA dispatches to, in the variants that also return the LSE:

* CPU: ``aten._scaled_dot_product_flash_attention_for_cpu`` (+ its ``_backward``);
* CUDA: ``aten._scaled_dot_product_efficient_attention`` (+ its ``_backward``), the memory-efficient
  kernel, which accepts an additive mask (written for GPUs; not run in this repository's CI).

Gradients of the mixture are exact, including the path through the mixing weights: for the final
output ``out = sum_p w_p o_p`` with ``w = softmax_p(lse_p)``, the gradient reaching pair ``p``'s
scores is ``P (dO_p . v - dO_p . out)`` with ``dO_p = w_p G``, i.e. the ordinary attention backward
with the pair's own output replaced by the *mixed* output. That is what :class:`DilatedMixFunction`
passes to each backward kernel, so no score matrix is ever stored.

Layout (per pair, ``n = ceil(N / s)`` segments of ``s = min(w, N)`` tokens, ``L = ceil(s / r)``):
dense (B, N, H, d) <-> sparse (B*n, H, L, d); head ``h`` keeps the tokens at offset
``h // ceil(H / r)`` of every run of ``r`` (heads split into ``r`` contiguous groups).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

#: log-sum-exp given to query rows that a pair does not cover (weight ~0 in the mixture, never NaN)
NEG_LSE = -1.0e30


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the mixture: float32 for half types, otherwise the input dtype."""
    return torch.promote_types(dtype, torch.float32)


def head_offsets(num_heads: int, ratio: int, device: torch.device | None = None) -> Tensor:
    """(H,) offset of each head for dilation ``ratio``: ``h // ceil(H / ratio)`` (LongNet's head groups)."""
    per_group = -(-num_heads // ratio)
    return torch.arange(num_heads, device=device) // per_group


def segment_geometry(n_tokens: int, segment: int, ratio: int) -> tuple[int, int, int]:
    """(s, n, L): effective segment length ``min(w, N)``, number of segments, sparse length per segment."""
    s = min(int(segment), int(n_tokens))
    return s, -(-n_tokens // s), -(-s // ratio)


def sparsify(x: Tensor, segment: int, ratio: int, fill: float | bool = 0.0) -> Tensor:
    """Dense (B, N, H, d) -> sparse (B*n, H, L, d); positions past the end are filled with ``fill``."""
    b, n_tok, h, d = x.shape
    s, n, length = segment_geometry(n_tok, segment, ratio)
    x = F.pad(x, (0, 0, 0, 0, 0, n * s - n_tok), value=fill) if n * s > n_tok else x
    x = x.reshape(b, n, s, h, d)
    if length * ratio > s:
        x = F.pad(x, (0, 0, 0, 0, 0, length * ratio - s), value=fill)
    if ratio == 1:
        x = x.reshape(b, n, length, h, d)
    else:
        x = x.reshape(b, n, length, ratio, h, d)
        off = head_offsets(h, ratio, x.device)
        x = x[:, :, :, off, torch.arange(h, device=x.device)]  # (B, n, L, H, d)
    return x.permute(0, 1, 3, 2, 4).reshape(b * n, h, length, d)


def densify(y: Tensor, n_tokens: int, segment: int, ratio: int, fill: float = 0.0) -> Tensor:
    """Sparse (B*n, H, L, d) -> dense (B, N, H, d); tokens a head does not cover get ``fill``."""
    bn, h, length, d = y.shape
    s, n, _ = segment_geometry(n_tokens, segment, ratio)
    b = bn // n
    y = y.reshape(b, n, h, length, d).permute(0, 1, 3, 2, 4)  # (B, n, L, H, d)
    out = y.new_full((b, n, length, ratio, h, d), fill)
    off = head_offsets(h, ratio, y.device)
    out[:, :, :, off, torch.arange(h, device=y.device)] = y
    out = out.reshape(b, n, length * ratio, h, d)[:, :, :s].reshape(b, n * s, h, d)
    return out[:, :n_tokens]


def densify_add_(dst: Tensor, y: Tensor, segment: int, ratio: int) -> None:
    """``dst`` (B, N, H, d) += densify(``y`` (B*n, H, L, d)), in place, without a dense temporary when
    N is a multiple of the segment and the segment a multiple of the ratio."""
    b, n_tok, h, d = dst.shape
    s, n, length = segment_geometry(n_tok, segment, ratio)
    if n * s != n_tok or length * ratio != s or not dst.is_contiguous():
        dst += densify(y.to(dst.dtype), n_tok, segment, ratio)
        return
    yv = y.to(dst.dtype).reshape(b, n, h, length, d)
    if ratio == 1:
        dst.view(b, n, length, h, d).add_(yv.permute(0, 1, 3, 2, 4))
        return
    view = dst.view(b, n, length, ratio, h, d).permute(3, 4, 0, 1, 2, 5)  # (r, H, B, n, L, d)
    off = head_offsets(h, ratio, dst.device)
    view.index_put_((off, torch.arange(h, device=dst.device)), yv.permute(2, 0, 1, 3, 4), accumulate=True)


def sparse_key_bias(
    key_valid: Tensor | None,
    b: int,
    n_tokens: int,
    h: int,
    segment: int,
    ratio: int,
    pad_valid: bool,
    dtype: torch.dtype,
    device: torch.device | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """Additive key mask (B*n, H, 1, L) (0 keep, -inf drop) and (B*n, H) "row has a valid key".

    ``key_valid`` (B, N) bool (True = real token) or None. Positions added by padding the sequence to
    segments (and segments to the dilation) are dropped unless ``pad_valid`` (the reference's zero keys).
    Returns (None, None) when nothing is masked.
    """
    s, n, length = segment_geometry(n_tokens, segment, ratio)
    needs_pad = n * s > n_tokens or length * ratio > s
    if key_valid is None and (pad_valid or not needs_pad):
        return None, None
    if key_valid is None:
        key_valid = torch.ones(b, n_tokens, dtype=torch.bool, device=device)
    kv = key_valid.to(torch.bool).reshape(b, n_tokens, 1, 1).expand(b, n_tokens, h, 1)
    sparse = sparsify(kv, segment, ratio, fill=bool(pad_valid))[..., 0]  # (B*n, H, L)
    bias = torch.zeros(sparse.shape, dtype=dtype, device=sparse.device).masked_fill(~sparse, float("-inf"))
    return bias.unsqueeze(2), sparse.any(dim=-1)


def attention_lse(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float
) -> tuple[Tensor, Tensor, tuple]:
    """Exact attention (B', H, L, d) with its float32 LSE (B', H, L) and what the backward kernel needs."""
    if q.device.type == "cpu":
        mask = None if bias is None else bias.to(q.dtype)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=mask, scale=scale
        )
        return out, lse.to(acc_dtype(q.dtype)), (mask,)
    if q.device.type == "cuda":
        full = cuda_key_bias(bias, q)
        out, lse, seed, offset = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, full, True, 0.0, False, scale=scale
        )
        return out, lse[..., : q.shape[-2]].to(acc_dtype(q.dtype)), (full, lse, seed, offset)
    raise RuntimeError(f"no fused dilated-attention kernel for device {q.device.type!r}; use backend='math'")


def attention_lse_backward(
    grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, extra: tuple, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) of the kernel of :func:`attention_lse` given ``out`` to use in the backward."""
    if q.device.type == "cpu":
        (mask,) = extra
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad, q, k, v, out, lse, 0.0, False, attn_mask=mask, scale=scale
        )
        return dq, dk, dv
    full, raw_lse, seed, offset = extra
    dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        grad, q, k, v, full, out, raw_lse, seed, offset, 0.0, [True, True, True, False], False, scale=scale
    )
    return dq, dk, dv


def cuda_key_bias(bias: Tensor | None, q: Tensor) -> Tensor | None:
    """Key bias for the memory-efficient kernel: None without a mask, else (B', H, L, L) in ``q``'s dtype.

    The (B', H, 1, L) key bias is stored with its last dimension padded to a multiple of 16 (the
    kernel's alignment) and broadcast over the queries (stride 0): memory stays linear in L.
    """
    if bias is None:
        return None
    b, h, length, _ = q.shape
    padded = -(-length // 16) * 16
    store = q.new_zeros(b, h, 1, padded)
    store[..., :length] = bias.to(q.dtype)
    return store[..., :length].expand(b, h, length, length)


def mix_pairs(
    outs: list[Tensor], lses: list[Tensor], geometry: list[tuple[int, int]], q: Tensor
) -> tuple[Tensor, Tensor]:
    """Mix per-pair sparse outputs (B*n, H, L, d) by their LSEs (B*n, H, L) into (B, N, H, d).

    ``geometry[i]`` = (segment, ratio) of pair ``i`` over ``q``'s (B, N, H, d) layout. Returns the mixed
    output in ``q``'s dtype and the total LSE (B, N, H, 1) that the backward pass needs.
    """
    f = acc_dtype(q.dtype)
    n_tok = q.shape[1]
    dense = [
        densify(lse.unsqueeze(-1), n_tok, w, r, fill=NEG_LSE)
        for lse, (w, r) in zip(lses, geometry, strict=True)
    ]
    lse_total = torch.logsumexp(torch.stack(dense), dim=0)  # (B, N, H, 1)
    del dense
    acc = torch.zeros(q.shape, dtype=f, device=q.device)
    for o, lse, (w, r) in zip(outs, lses, geometry, strict=True):
        weight = torch.exp(lse - sparsify(lse_total, w, r, fill=0.0)[..., 0]).unsqueeze(-1)
        densify_add_(acc, o.to(f) * weight, w, r)
    return acc.to(q.dtype), lse_total


class DilatedMixFunction(torch.autograd.Function):
    """All (w, r) pairs of one dilated-attention call, mixed by their LSE; exact fused backward.

    forward(q, k, v (B, N, H, d), key_valid (B, N) bool | None, pairs ((w, r), ...), pad_valid, scale)
    -> (B, N, H, d). Saved for backward: the dense q, k, v, output and LSE, plus each pair's sparse LSE.
    """

    @staticmethod
    def forward(ctx, q, k, v, key_valid, pairs, pad_valid, scale):  # type: ignore[override]
        b, n_tok, h, _ = q.shape
        f = acc_dtype(q.dtype)
        saved_lse, extras, outs = [], [], []
        for w, r in pairs:
            qs, ks, vs = (sparsify(t, w, r) for t in (q, k, v))
            bias, row_ok = sparse_key_bias(key_valid, b, n_tok, h, w, r, pad_valid, f, q.device)
            o, lse, extra = attention_lse(qs, ks, vs, bias, scale)
            extras.append(extra[1:] if q.device.type == "cuda" else ())
            if row_ok is not None:
                lse = lse.masked_fill(~row_ok.unsqueeze(-1), NEG_LSE)
                o = o.masked_fill(~row_ok[..., None, None], 0.0)
            saved_lse.append(lse)
            outs.append(o)
        out, lse_total = mix_pairs(outs, saved_lse, list(pairs), q)
        del outs
        ctx.save_for_backward(
            q, k, v, out, lse_total, key_valid if key_valid is not None else torch.empty(0), *saved_lse
        )
        ctx.pairs, ctx.pad_valid, ctx.scale, ctx.has_mask = pairs, pad_valid, scale, key_valid is not None
        ctx.kernel_extras = extras  # CUDA: (raw LSE, philox seed, offset) per pair; CPU: nothing
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        q, k, v, out, lse_total, key_valid, *saved_lse = ctx.saved_tensors
        key_valid = key_valid if ctx.has_mask else None
        b, n_tok, h, _ = q.shape
        f = acc_dtype(q.dtype)
        dq, dk, dv = (torch.zeros(t.shape, dtype=f, device=t.device) for t in (q, k, v))
        grad = grad.contiguous()
        for (w, r), lse, kernel_extra in zip(ctx.pairs, saved_lse, ctx.kernel_extras, strict=True):
            qs, ks, vs, outs, gs = (sparsify(t, w, r) for t in (q, k, v, out, grad))
            tot = sparsify(lse_total, w, r, fill=0.0)[..., 0]  # (B*n, H, L)
            weight = torch.exp(lse - tot).unsqueeze(-1)  # this pair's share of each output row
            bias, row_ok = sparse_key_bias(key_valid, b, n_tok, h, w, r, ctx.pad_valid, f, q.device)
            if q.device.type == "cuda":
                raw_lse, seed, offset = kernel_extra
                if row_ok is not None:  # rows with no key: any finite LSE (their gradient is zeroed below)
                    raw_lse = raw_lse.masked_fill(~row_ok.unsqueeze(-1), 0.0)
                extra: tuple = (cuda_key_bias(bias, qs), raw_lse, seed, offset)
            else:  # fully masked rows: any finite LSE (their gradient is zeroed below)
                extra = (None if bias is None else bias.to(q.dtype),)
                raw_lse = torch.where(lse <= NEG_LSE / 2, torch.zeros_like(lse), lse)
            g_pair = (gs.to(f) * weight).to(q.dtype)
            if row_ok is not None:
                g_pair = g_pair.masked_fill(~row_ok[..., None, None], 0.0)
            gq, gk, gv = attention_lse_backward(g_pair, qs, ks, vs, outs, raw_lse, extra, ctx.scale)
            densify_add_(dq, gq, w, r)
            densify_add_(dk, gk, w, r)
            densify_add_(dv, gv, w, r)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def dilated_attention_math(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_valid: Tensor | None,
    pairs: tuple[tuple[int, int], ...],
    pad_valid: bool,
    scale: float,
    dropout: float = 0.0,
) -> Tensor:
    """Same result as :class:`DilatedMixFunction` with explicit per-segment scores and plain autograd.

    Works on every device and supports attention dropout; memory per pair is (B*n, H, L, L) scores,
    still linear in N for a fixed schedule. (B, N, H, d) -> (B, N, H, d).
    """
    b, n_tok, h, _ = q.shape
    outs, lses = [], []
    for w, r in pairs:
        qs, ks, vs = (sparsify(t, w, r) for t in (q, k, v))
        f = acc_dtype(q.dtype)
        scores = (qs.to(f) @ ks.to(f).transpose(-1, -2)) * scale  # (B*n, H, L, L)
        bias, row_ok = sparse_key_bias(key_valid, b, n_tok, h, w, r, pad_valid, f, q.device)
        if bias is not None:
            scores = scores + bias.clamp_min(NEG_LSE)  # finite: fully masked rows stay NaN-free
        lse = torch.logsumexp(scores, dim=-1)  # (B*n, H, L)
        probs = torch.exp(scores - lse.unsqueeze(-1))
        if dropout > 0.0:
            probs = F.dropout(probs, p=dropout)
        o = probs @ vs.to(f)
        if row_ok is not None:
            lse = lse.masked_fill(~row_ok.unsqueeze(-1), NEG_LSE)
            o = o.masked_fill(~row_ok[..., None, None], 0.0)
        outs.append(densify(o, n_tok, w, r))
        lses.append(densify(lse.unsqueeze(-1), n_tok, w, r, fill=NEG_LSE))
    weights = torch.softmax(torch.stack(lses), dim=0)  # (P, B, N, H, 1)
    return (torch.stack(outs) * weights).sum(0).to(q.dtype)


def default_scale(head_dim: int) -> float:
    """Softmax temperature ``1 / sqrt(head_dim)``."""
    return 1.0 / math.sqrt(head_dim)
