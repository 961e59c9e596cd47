"""Gradient-carrying collectives: 3 gloo processes on CPU against one process computing the same losses."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gigaslide.utils.collectives import all_gather_with_grad, gather_to_rank, scatter_from_rank

SIZES = [3, 1, 4]  # uneven rows per rank
WORLD = len(SIZES)


def _data() -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(sum(SIZES), 5, generator=g)
    weights = [torch.randn(sum(SIZES), 5, generator=g) for _ in range(WORLD)]
    return x, weights


def _rows(rank: int) -> slice:
    start = sum(SIZES[:rank])
    return slice(start, start + SIZES[rank])


def _worker(rank: int, init: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    torch.manual_seed(rank)
    x, weights = _data()
    res: dict[str, torch.Tensor] = {}
    # all_gather_with_grad: rank r's loss L_r = sum(W_r * tanh(all rows))
    local = x[_rows(rank)].clone().requires_grad_(True)
    full = all_gather_with_grad(local)
    (weights[rank] * torch.tanh(full)).sum().backward()
    res["all_gather_out"], res["all_gather_grad"] = full.detach(), local.grad
    # gather_to_rank: the aggregator rank 0 computes L = sum(W_0 * rows^2); others join the backward
    local = x[_rows(rank)].clone().requires_grad_(True)
    got = gather_to_rank(local, dst=0)
    if rank == 0:
        (weights[0] * got**2).sum().backward()
        res["gather_out"] = got.detach()
    else:
        assert got.shape == (0, 5)
        torch.autograd.backward(got, torch.zeros_like(got))
    res["gather_grad"] = local.grad
    # scatter_from_rank: rank 0 holds all rows; every rank's loss uses its own rows
    src = x.clone().requires_grad_(True) if rank == 0 else torch.empty(0, 5, requires_grad=True)
    mine = scatter_from_rank(src, SIZES, src=0)
    (weights[rank][_rows(rank)] * mine**3).sum().backward()
    res["scatter_out"] = mine.detach()
    if rank == 0:
        res["scatter_grad"] = src.grad
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.distributed
def test_collectives_equal_one_process(tmp_path: Path) -> None:
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_worker, args=(init, str(tmp_path)), nprocs=WORLD, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    x, weights = _data()
    # reference: one process, the sum of every rank's loss
    ref = x.clone().requires_grad_(True)
    sum((w * torch.tanh(ref)).sum() for w in weights).backward()
    for r in range(WORLD):
        torch.testing.assert_close(res[r]["all_gather_out"], x)
        torch.testing.assert_close(res[r]["all_gather_grad"], ref.grad[_rows(r)], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(res[0]["gather_out"], x)
    for r in range(WORLD):
        torch.testing.assert_close(res[r]["gather_grad"], (2 * weights[0] * x)[_rows(r)])
        torch.testing.assert_close(res[r]["scatter_out"], x[_rows(r)])
    expected = torch.cat([(3 * weights[r] * x**2)[_rows(r)] for r in range(WORLD)])
    torch.testing.assert_close(res[0]["scatter_grad"], expected)


def test_one_process_is_the_identity() -> None:
    x = torch.randn(4, 3, requires_grad=True)
    assert all_gather_with_grad(x) is x
    assert gather_to_rank(x) is x
    assert scatter_from_rank(x, [4]) is x
    with pytest.raises(ValueError, match=r"sizes \[2, 2\] must be \[4\]"):
        scatter_from_rank(x, [2, 2])
