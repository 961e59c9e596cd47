"""Collectives that carry gradients, for losses and models split across processes.

* :func:`all_gather_with_grad` — every rank gets the rows of all ranks ``(sum_r B_r, ...)``; the
  backward pass sums each rank's gradient for a row and returns it to the rank that owns the row.
  With per-rank losses ``L_r`` and DDP averaging parameter gradients, parameters receive the gradient
  of ``mean_r L_r``, exactly as one process computing the same losses on all rows (SimCLR negatives
  across GPUs).
* :func:`gather_to_rank` / :func:`scatter_from_rank` — move rows to one rank and back, with autograd:
  the gradient of a gathered tensor is scattered back to the rows' owners, and vice versa
  (end-to-end training: tile features gathered on the aggregator rank, their gradients scattered
  back to the encoder ranks).

Row counts may differ between ranks (tensors are padded on the wire). Without a process group every
function is the identity, so the same code runs in one process. On ranks that receive nothing,
:func:`gather_to_rank` returns an empty ``(0, ...)`` tensor still connected to the input: call
``torch.autograd.backward(out, torch.zeros_like(out))`` there so that the rank joins the backward
collective.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def _active(group: dist.ProcessGroup | None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _sizes(x: Tensor, group: dist.ProcessGroup | None) -> list[int]:
    """Row count of every rank, in rank order of ``group``."""
    n = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    out = [torch.zeros_like(n) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, n, group=group)
    return [int(t) for t in out]


def _pad(x: Tensor, rows: int) -> Tensor:
    if x.shape[0] == rows:
        return x.contiguous()
    pad = x.new_zeros((rows - x.shape[0], *x.shape[1:]))
    return torch.cat([x, pad]).contiguous()


def _group_rank(group: dist.ProcessGroup | None) -> int:
    return dist.get_rank(group)


def _global(group: dist.ProcessGroup | None, group_rank: int) -> int:
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup | None) -> Tensor:  # (B_r, ...) -> (sum B, ...)
        sizes = _sizes(x, group)
        top = max(sizes)
        parts = [x.new_empty((top, *x.shape[1:])) for _ in sizes]
        dist.all_gather(parts, _pad(x, top), group=group)
        ctx.sizes, ctx.rank, ctx.group = sizes, _group_rank(group), group
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None


class _GatherToRank(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, dst: int, group: dist.ProcessGroup | None) -> Tensor:
        sizes = _sizes(x, group)
        top = max(sizes)
        rank = _group_rank(group)
        parts = [x.new_empty((top, *x.shape[1:])) for _ in sizes] if rank == dst else None
        dist.gather(_pad(x, top), parts, dst=_global(group, dst), group=group)
        ctx.sizes, ctx.rank, ctx.dst, ctx.group, ctx.tail = sizes, rank, dst, group, tuple(x.shape[1:])
        if rank == dst:
            return torch.cat([p[:n] for p, n in zip(parts, sizes)])
        return x.new_zeros((0, *x.shape[1:]))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        top = max(ctx.sizes)
        chunks = None
        if ctx.rank == ctx.dst:
            chunks = [_pad(g, top) for g in torch.split(grad.contiguous(), ctx.sizes)]
        out = grad.new_empty((top, *ctx.tail))
        dist.scatter(out, chunks, src=_global(ctx.group, ctx.dst), group=ctx.group)
        return out[: ctx.sizes[ctx.rank]], None, None


class _ScatterFromRank(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, sizes: list[int], src: int, group: dist.ProcessGroup | None) -> Tensor:
        rank = _group_rank(group)
        top = max(sizes)
        chunks = None
        if rank == src:
            if x.shape[0] != sum(sizes):
                raise ValueError(
                    f"scatter_from_rank: {x.shape[0]} rows on the source rank, sizes sum to {sum(sizes)}"
                )
            chunks = [_pad(c, top) for c in torch.split(x.contiguous(), sizes)]
        tail = torch.tensor(list(x.shape[1:]), dtype=torch.long, device=x.device)
        dist.broadcast(
            tail, src=_global(group, src), group=group
        )  # ranks other than src may pass a placeholder
        shape = tuple(int(t) for t in tail)
        out = x.new_empty((top, *shape))
        dist.scatter(out, chunks, src=_global(group, src), group=group)
        ctx.sizes, ctx.rank, ctx.src, ctx.group, ctx.in_shape = sizes, rank, src, group, tuple(x.shape)
        return out[: sizes[rank]]

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        top = max(ctx.sizes)
        parts = [grad.new_empty((top, *grad.shape[1:])) for _ in ctx.sizes] if ctx.rank == ctx.src else None
        dist.gather(_pad(grad, top), parts, dst=_global(ctx.group, ctx.src), group=ctx.group)
        if ctx.rank == ctx.src:
            return torch.cat([p[:n] for p, n in zip(parts, ctx.sizes)]), None, None, None
        return grad.new_zeros(ctx.in_shape), None, None, None


def all_gather_with_grad(x: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """(B_r, ...) on each rank -> (sum_r B_r, ...) on every rank, in rank order; gradients flow back."""
    if not _active(group):
        return x
    return _AllGather.apply(x, group)


def gather_to_rank(x: Tensor, dst: int = 0, group: dist.ProcessGroup | None = None) -> Tensor:
    """(B_r, ...) on each rank -> (sum_r B_r, ...) on ``dst`` (group rank), (0, ...) elsewhere; the
    backward scatters ``dst``'s gradient rows back to their owners."""
    if not _active(group):
        return x
    return _GatherToRank.apply(x, dst, group)


def scatter_from_rank(
    x: Tensor, sizes: list[int], src: int = 0, group: dist.ProcessGroup | None = None
) -> Tensor:
    """Rows of ``x`` on ``src`` split by ``sizes`` (one count per rank) -> this rank's rows; the backward
    gathers the rows' gradients back onto ``src``. Other ranks pass any tensor of the same dtype
    (e.g. an empty one) as ``x``."""
    if not _active(group):
        if len(sizes) != 1 or sizes[0] != x.shape[0]:
            raise ValueError(f"scatter_from_rank in one process: sizes {sizes} must be [{x.shape[0]}]")
        return x
    if len(sizes) != dist.get_world_size(group):
        raise ValueError(f"scatter_from_rank: {len(sizes)} sizes for {dist.get_world_size(group)} ranks")
    return _ScatterFromRank.apply(x, [int(s) for s in sizes], src, group)
