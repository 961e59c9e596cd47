"""Sequence-parallel dilated attention (LongNet's distributed algorithm).

The sequence is split into equal contiguous chunks, one per rank of a process group (rank ``i`` holds
tokens ``[i * n, (i + 1) * n)``). A (w, r) pair whose segments fit in a chunk is computed locally.
A pair with segments longer than a chunk spans ``k = min(w // n, P)`` ranks: every rank sparsifies its
own chunk (queries, keys, values), all-gathers the sparse keys and values of the ranks in its
segment, attends, and in the backward pass the key/value gradients are summed across ranks and
returned to their owners. The dilated pieces are ``1 / r`` of a chunk, so the traffic is that of
LongNet: constant per rank as the sequence grows with the number of ranks.

The result equals one process running :class:`DilatedAttention` on the whole sequence (tested with
two gloo processes). Requirements, checked with clear errors: equal chunk lengths, chunk length a
multiple of every ratio, and segments either dividing the chunk or multiples of it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from gigaslide.models.layers.dilated_kernels import (
    NEG_LSE,
    acc_dtype,
    attention_lse,
    attention_lse_backward,
    cuda_key_bias,
    densify_add_,
    mix_pairs,
    sparse_key_bias,
    sparsify,
)


def check_parallel_schedule(pairs: tuple[tuple[int, int], ...], chunk: int, world: int) -> None:
    """Raise a ValueError naming the pair when the schedule cannot be split into ``world`` chunks."""
    for w, r in pairs:
        if chunk % r:
            raise ValueError(
                f"sequence parallel: chunk length {chunk} is not a multiple of dilation ratio {r}"
            )
        if w <= chunk and chunk % w:
            raise ValueError(
                f"sequence parallel: segment length {w} does not divide the chunk length {chunk}"
            )
        if w > chunk and w % chunk:
            raise ValueError(
                f"sequence parallel: segment length {w} is not a multiple of the chunk length {chunk}"
            )


def _gather(x: Tensor, group: dist.ProcessGroup | None, world: int) -> Tensor:
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.stack(parts)  # (P, ...)


class _Plan:
    """Which ranks share a segment of pair (w, r) with this rank."""

    def __init__(self, w: int, chunk: int, world: int, rank: int) -> None:
        self.span = min(w // chunk, world) if w > chunk else 1
        self.first = rank // self.span * self.span if self.span > 1 else rank


class SeqParallelDilatedMix(torch.autograd.Function):
    """Dilated attention on this rank's chunk q, k, v (B, n, H, d); see the module docstring."""

    @staticmethod
    def forward(ctx, q, k, v, key_valid, pairs, pad_valid, scale, group):  # type: ignore[override]
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        b, n, h, _ = q.shape
        check_parallel_schedule(pairs, n, world)
        f = acc_dtype(q.dtype)
        kv_all = None if key_valid is None else _gather(key_valid.to(torch.uint8), group, world).bool()
        saved, extras, outs, geometry = [], [], [], []
        for w, r in pairs:
            plan = _Plan(w, n, world, rank)
            seg = w if plan.span == 1 else n
            qs, ks, vs = (sparsify(t, seg, r) for t in (q, k, v))
            bias, row_ok = SeqParallelDilatedMix._bias(
                key_valid, kv_all, plan, b, n, h, seg, r, pad_valid, f, q.device
            )
            if plan.span > 1:
                ks, vs = (_gather(t, group, world)[plan.first : plan.first + plan.span] for t in (ks, vs))
                ks, vs = (t.permute(1, 2, 0, 3, 4).flatten(2, 3) for t in (ks, vs))  # (B, H, span*L, d)
            o, lse, extra = attention_lse(qs, ks, vs, bias, scale)
            extras.append(extra[1:] if q.device.type == "cuda" else ())
            if row_ok is not None:
                lse = lse.masked_fill(~row_ok.unsqueeze(-1), NEG_LSE)
                o = o.masked_fill(~row_ok[..., None, None], 0.0)
            saved.append(lse)
            outs.append(o)
            geometry.append((seg, r))
        out, lse_total = mix_pairs(outs, saved, geometry, q)
        del outs
        kv = key_valid if key_valid is not None else torch.empty(0)
        ctx.save_for_backward(q, k, v, out, lse_total, kv, *saved)
        ctx.cfg = (pairs, pad_valid, scale, group, key_valid is not None, extras)
        return out

    @staticmethod
    def _bias(key_valid, kv_all, plan, b, n, h, seg, r, pad_valid, f, device):
        if plan.span == 1 or kv_all is None:
            bias, row_ok = sparse_key_bias(key_valid, b, n, h, seg, r, pad_valid, f, device)
            if plan.span == 1 or bias is None:
                return bias, row_ok
        parts = [
            sparse_key_bias(kv_all[i], b, n, h, seg, r, pad_valid, f, device)
            for i in range(plan.first, plan.first + plan.span)
        ]
        bias = torch.cat([p[0] for p in parts], dim=-1)  # (B, H, 1, span*L)
        return bias, torch.stack([p[1] for p in parts]).any(0)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        q, k, v, out, lse_total, key_valid, *saved = ctx.saved_tensors
        pairs, pad_valid, scale, group, has_mask, extras = ctx.cfg
        key_valid = key_valid if has_mask else None
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        b, n, h, _ = q.shape
        f = acc_dtype(q.dtype)
        kv_all = None if key_valid is None else _gather(key_valid.to(torch.uint8), group, world).bool()
        dq, dk, dv = (torch.zeros(t.shape, dtype=f, device=t.device) for t in (q, k, v))
        grad = grad.contiguous()
        for (w, r), lse, kextra in zip(pairs, saved, extras, strict=True):
            plan = _Plan(w, n, world, rank)
            seg = w if plan.span == 1 else n
            qs, ks, vs, outs, gs = (sparsify(t, seg, r) for t in (q, k, v, out, grad))
            length = ks.shape[2]
            if plan.span > 1:
                ks, vs = (_gather(t, group, world)[plan.first : plan.first + plan.span] for t in (ks, vs))
                ks, vs = (t.permute(1, 2, 0, 3, 4).flatten(2, 3) for t in (ks, vs))
            tot = sparsify(lse_total, seg, r, fill=0.0)[..., 0]
            weight = torch.exp(lse - tot).unsqueeze(-1)
            bias, row_ok = SeqParallelDilatedMix._bias(
                key_valid, kv_all, plan, b, n, h, seg, r, pad_valid, f, q.device
            )
            if q.device.type == "cuda":
                raw_lse, seed, offset = kextra
                if row_ok is not None:
                    raw_lse = raw_lse.masked_fill(~row_ok.unsqueeze(-1), 0.0)
                extra: tuple = (cuda_key_bias(bias, qs), raw_lse, seed, offset)
            else:
                extra = (None if bias is None else bias.to(q.dtype),)
                raw_lse = torch.where(lse <= NEG_LSE / 2, torch.zeros_like(lse), lse)
            g_pair = (gs.to(f) * weight).to(q.dtype)
            if row_ok is not None:
                g_pair = g_pair.masked_fill(~row_ok[..., None, None], 0.0)
            gq, gk, gv = attention_lse_backward(g_pair, qs, ks, vs, outs, raw_lse, extra, scale)
            if plan.span > 1:  # key/value gradients belong to the ranks that own those keys
                gk, gv = (
                    SeqParallelDilatedMix._return_to_owner(t, plan, rank, world, length, group)
                    for t in (gk, gv)
                )
            densify_add_(dq, gq, seg, r)
            densify_add_(dk, gk, seg, r)
            densify_add_(dv, gv, seg, r)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None

    @staticmethod
    def _return_to_owner(g: Tensor, plan: _Plan, rank: int, world: int, length: int, group) -> Tensor:
        """(B, H, span*L, d) gradients for the segment's keys -> this rank's (B, H, L, d), summed over ranks."""
        b, h, _, d = g.shape
        full = g.new_zeros(world, b, h, length, d)
        full[plan.first : plan.first + plan.span] = g.reshape(b, h, plan.span, length, d).permute(
            2, 0, 1, 3, 4
        )
        dist.all_reduce(full, op=dist.ReduceOp.SUM, group=group)
        return full[rank]
