"""The engine under torch.distributed: 2 gloo processes with DDP equal one process on the whole batch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from gigaslide.train.engine import Engine, EngineConfig, Objective, OptimConfig, StepContext, StepOutput

WORLD = 2
STEPS = 3


def _batches(rank: int | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        x, y = torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g)
        out.append((x, y) if rank is None else (x[rank::WORLD], y[rank::WORLD]))
    return out


class Data:
    def __init__(self, rank: int | None) -> None:
        self.items = _batches(rank)

    def __len__(self) -> int:
        return len(self.items)

    def batches(self, epoch: int, start: int = 0):
        yield from self.items[start:]


class Regress(Objective):
    def __init__(self) -> None:
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.net}

    def train_step(self, batch, ctx: StepContext) -> StepOutput:
        x, y = batch
        return StepOutput(((ctx.models["model"](x) - y) ** 2).mean())


OPT = OptimConfig(name="sgd", lr=0.1, momentum=0.9, lr_schedule="constant", weight_decay=1e-3)


def _worker(rank: int, init: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    obj = Regress()
    engine = Engine(obj, OPT, EngineConfig(epochs=1, progress=False, out_dir=out_dir), "cpu")
    assert isinstance(engine.models["model"], nn.parallel.DistributedDataParallel)
    engine.fit(Data(rank))
    torch.save(obj.net.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.distributed
def test_ddp_equals_one_process_on_the_whole_batch(tmp_path: Path) -> None:
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_worker, args=(init, str(tmp_path)), nprocs=WORLD, join=True)
    ref = Regress()
    Engine(ref, OPT, EngineConfig(epochs=1, progress=False), "cpu").fit(Data(None))
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for k, v in ref.net.state_dict().items():
        torch.testing.assert_close(states[0][k], v, rtol=1e-5, atol=1e-6)
        assert torch.equal(states[0][k], states[1][k])  # replicas stay identical
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert len(ckpt["engine"]["rng"]) == WORLD and ckpt["engine"]["world_size"] == WORLD
