"""NT-Xent negatives and the DINO center across 2 gloo processes equal one process on the full batch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gigaslide.ssl.dino_loss import DINOLoss
from gigaslide.ssl.ntxent import NTXentLoss

WORLD, N, D, K = 2, 3, 6, 5


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(WORLD * N, D, generator=g),
        torch.randn(WORLD * N, D, generator=g),
        torch.randn(2 * WORLD * N, K, generator=g),
    )


def _worker(rank: int, init: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    z1, z2, teacher = _data()
    rows = slice(rank * N, (rank + 1) * N)
    a = z1[rows].clone().requires_grad_(True)
    b = z2[rows].clone().requires_grad_(True)
    loss = NTXentLoss(0.2)(a, b)
    loss.backward()
    # DINO: each rank holds its B = N images' 2 global views: (2N, K), view-major
    t = teacher.view(2, WORLD * N, K)[:, rows].reshape(2 * N, K)
    dino = DINOLoss(K, 2, 0.04, 0.04, 0, 1)
    dino.update_center(t)
    torch.save({"loss": loss.detach(), "ga": a.grad, "gb": b.grad, "center": dino.center},
               os.path.join(out_dir, f"rank{rank}.pt"))  # fmt: skip
    dist.destroy_process_group()


@pytest.mark.distributed
def test_two_processes_equal_one(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(f"file://{tmp_path / 'rendezvous'}", str(tmp_path)), nprocs=WORLD, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    z1, z2, teacher = _data()
    a, b = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    full = NTXentLoss(0.2)(a, b)  # one process: 4N views, 4N - 2 negatives each, like every rank's anchors
    full.backward()
    # the mean of the ranks' losses is the full-batch loss; each rank's gradient is its slice of the
    # gradient of the SUM of the ranks' losses (DDP then averages over ranks)
    torch.testing.assert_close(sum(r["loss"] for r in res) / WORLD, full.detach())
    for r in range(WORLD):
        rows = slice(r * N, (r + 1) * N)
        torch.testing.assert_close(res[r]["ga"], WORLD * a.grad[rows], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(res[r]["gb"], WORLD * b.grad[rows], rtol=1e-5, atol=1e-6)
        # the center is the mean over every rank's teacher outputs
        torch.testing.assert_close(res[r]["center"], 0.1 * teacher.mean(dim=0, keepdim=True))
