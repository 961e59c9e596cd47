"""End-to-end training: naive, gradient-cached and distributed (3 gloo processes) runs give the same weights.

The paper's gradient-equivalence experiment, made exact: deterministic encoders (linear + ReLU, and a
small CNN with batch norm frozen), a gated-attention aggregator without dropout, several SGD steps.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from gigaslide.data.slide_tiles import SlideBatch
from gigaslide.models.slide import create_slide_model
from gigaslide.train.e2e import E2EObjective, freeze_batchnorm
from gigaslide.train.engine import Engine, EngineConfig, OptimConfig

K, DIM, N_SLIDES = 7, 6, 4
SHARES = 2  # encoder processes in the distributed run (7 tiles -> 4 + 3)


def _encoder(kind: str) -> nn.Module:
    torch.manual_seed(1)
    if kind == "linear":
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, DIM), nn.ReLU())
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(16, DIM),
    )  # fmt: skip
    with torch.no_grad():  # non-trivial running statistics
        net[1].running_mean.uniform_(-0.2, 0.2)
        net[1].running_var.uniform_(0.5, 1.5)
    freeze_batchnorm(net)
    return net


def _aggregator() -> nn.Module:
    torch.manual_seed(2)
    return create_slide_model("gated_abmil", in_dim=DIM, n_classes=2, hidden_dims=(8, 4), dropout=0.0)


class Slides:
    """In-memory slides; ``share`` = (index, count) splits each slide's K tiles like the real data view."""

    def __init__(self, share: tuple[int, int] | None = None, read: bool = True) -> None:
        g = torch.Generator().manual_seed(3)
        self.images = [torch.randn(K, 3, 8, 8, generator=g) for _ in range(N_SLIDES)]
        self.targets = [0, 1, 1, 0]
        self.share, self.read = share, read

    def __len__(self) -> int:
        return N_SLIDES

    def batches(self, epoch: int, start: int = 0):
        count = self.share[1] if self.share else 1
        parts = np.array_split(np.arange(K), count)
        for i in range(start, N_SLIDES):
            rows = parts[self.share[0]] if self.share else np.arange(K)
            images = self.images[i][torch.from_numpy(rows)] if self.read else None
            yield SlideBatch(f"s{i}", images, torch.tensor([self.targets[i]]), [len(p) for p in parts], rows)


OPT = OptimConfig(name="sgd", lr=0.5, momentum=0.9, lr_schedule="constant")


def _train(kind: str, mode: str, chunk: int | None = None, data: Slides | None = None) -> E2EObjective:
    obj = E2EObjective(_encoder(kind), _aggregator(), mode=mode, chunk_size=chunk, feature_dim=DIM)
    Engine(obj, OPT, EngineConfig(epochs=2, progress=False), "cpu").fit(data or Slides())
    return obj


def _params(obj: E2EObjective) -> dict[str, torch.Tensor]:
    return {
        f"{n}.{k}": v.detach().clone() for n, m in obj.modules().items() for k, v in m.state_dict().items()
    }


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("kind", ["linear", "cnn"])
@pytest.mark.parametrize("chunk", [1, 3, K])
def test_cached_equals_naive(kind: str, chunk: int) -> None:
    naive = _train(kind, "naive")
    cached = _train(kind, "cached", chunk)
    before = _params(E2EObjective(_encoder(kind), _aggregator()))
    moved = [k for k in before if not torch.equal(before[k], _params(naive)[k])]
    assert any(k.startswith("encoder.") for k in moved) and any(k.startswith("aggregator.") for k in moved)
    _assert_same(_params(naive), _params(cached))


def test_cached_replays_dropout_and_keeps_batchnorm_statistics_single() -> None:
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Flatten(), nn.Linear(192, DIM), nn.BatchNorm1d(DIM), nn.Dropout(0.5))
    ref = nn.Sequential(nn.Flatten(), nn.Linear(192, DIM), nn.BatchNorm1d(DIM), nn.Dropout(0.5))
    ref.load_state_dict(enc.state_dict())
    obj = E2EObjective(enc, _aggregator(), mode="cached", chunk_size=K)
    x = torch.randn(K, 3, 8, 8)
    ctx = _ctx()
    feats, states = obj.encode_with_cache(enc, x, K, ctx)
    assert torch.equal(enc[2].running_mean, ref[2].running_mean)  # pass 1 left the statistics alone
    grads = torch.randn_like(feats)
    obj.backprop_with_cache(enc, x, grads, K, states, ctx)
    torch.set_rng_state(states[0][0])
    f = ref(x)  # one pass with the same RNG: same dropout mask, one statistics update
    f.backward(grads)
    torch.testing.assert_close(feats, f.detach())
    torch.testing.assert_close(enc[1].weight.grad, ref[1].weight.grad)
    torch.testing.assert_close(enc[2].running_mean, ref[2].running_mean)
    assert int(enc[2].num_batches_tracked) == 1


def _ctx():
    from contextlib import nullcontext

    from gigaslide.train.engine import StepContext

    return StepContext(0, 0, 0, 0.0, 0.0, {}, {}, torch.device("cpu"), nullcontext)


def _worker(rank: int, init: str, out_dir: str, kind: str, chunk: int | None) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=SHARES + 1)
    data = Slides(share=(max(rank - 1, 0), SHARES), read=rank > 0)
    obj = _train(kind, "distributed", chunk, data)
    # after before_save-style sync every rank could save; gather both modules explicitly here
    obj.before_save(None)
    if rank == 0:
        torch.save(_params(obj), os.path.join(out_dir, "dist.pt"))
    dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize("kind,chunk", [("linear", None), ("cnn", 2)])
def test_distributed_equals_naive(tmp_path: Path, kind: str, chunk: int | None) -> None:
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_worker, args=(init, str(tmp_path), kind, chunk), nprocs=SHARES + 1, join=True)
    _assert_same(_params(_train(kind, "naive")), torch.load(tmp_path / "dist.pt"))


def test_modes_are_checked() -> None:
    with pytest.raises(ValueError, match="mode must be one of"):
        E2EObjective(_encoder("linear"), _aggregator(), mode="pipeline")
    with pytest.raises(ValueError, match="needs chunk_size"):
        E2EObjective(_encoder("linear"), _aggregator(), mode="cached")
    with pytest.raises(ValueError, match="torchrun --nproc_per_node N\\+1"):
        E2EObjective(_encoder("linear"), _aggregator(), mode="distributed", feature_dim=DIM)
