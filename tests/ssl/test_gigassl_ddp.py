"""Giga-SSL pretraining under torch.distributed (2 gloo processes): replicas stay identical, negatives
come from both ranks, one checkpoint is written."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
from gigassl_synth import write_synthetic_bank

WORLD = 2


def _worker(rank: int, init: str, root: str) -> None:
    from gigaslide.ssl import ntxent, simclr

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT="0")  # fmt: skip
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    seen: list[int] = []
    gather = ntxent._gather

    def counting(x: torch.Tensor) -> torch.Tensor:
        out = gather(x)
        seen.append(out.shape[0])
        return out

    ntxent._gather = counting
    built = []
    build = simclr.build_gigassl_model
    simclr.build_gigassl_model = lambda *a, **k: built.append(build(*a, **k)) or built[-1]
    cfg = simclr.GigaSSLConfig(
        aggregator_kwargs={"width": 16}, proj_dim=8, warmup_epochs=0, lr=0.1, temperature=0.1
    )
    simclr.pretrain_gigassl(Path(root) / "bank", Path(root) / "ssl", epochs=1, batch_size=2, cfg=cfg, device="cpu",
                     progress=False)  # fmt: skip
    assert seen and all(n == 2 * WORLD for n in seen)  # each view's projections from both ranks
    torch.save(built[0].state_dict(), Path(root) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_train_one_model(tmp_path: Path) -> None:
    write_synthetic_bank(tmp_path / "bank", n_slides=8, n_aug=2, n_tiles=6, dim=8)
    mp.spawn(_worker, args=(f"file://{tmp_path / 'rendezvous'}", str(tmp_path)), nprocs=WORLD, join=True)
    ckpt = torch.load(tmp_path / "ssl" / "checkpoint.pth", weights_only=False)
    assert (
        ckpt["engine"]["world_size"] == WORLD and ckpt["engine"]["step"] == 2
    )  # 8 slides / (2 x 2) per step
    assert any(k.startswith("aggregator.layer4.") for k in ckpt["model"])
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for k, v in ckpt["model"].items():
        if "running_" in k or "num_batches" in k:
            continue  # batch-norm statistics are per rank (no SyncBatchNorm), as with DDP in general
        assert torch.equal(states[0][k], states[1][k]), k  # replicas stay identical
        assert torch.equal(states[0][k], v), k
