"""The training engine: exact resume, accumulation, schedules, parameter groups, logs, refusals."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gigaslide.train.checkpoint import CHECKPOINT_NAME, CheckpointError
from gigaslide.train.engine import (
    Engine,
    EngineConfig,
    Objective,
    OptimConfig,
    StepContext,
    StepOutput,
    weight_decay_groups,
)


class Noisy:
    """Micro-batches whose content and augmentation noise depend only on (seed, epoch, index)."""

    def __init__(self, n: int = 7, batch: int = 4, seed: int = 0) -> None:
        self.n, self.batch, self.seed = n, batch, seed
        gen = np.random.default_rng(123)
        self.x = gen.normal(size=(n * batch, 5)).astype(np.float32)
        self.y = (self.x[:, 0] + 0.5 * self.x[:, 1] > 0).astype(np.int64)

    def __len__(self) -> int:
        return self.n

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.x))
        for i in range(start, self.n):
            idx = order[i * self.batch : (i + 1) * self.batch]
            noise = np.random.default_rng([self.seed, epoch, i]).normal(0, 0.1, size=(len(idx), 5))
            yield torch.from_numpy(self.x[idx] + noise.astype(np.float32)), torch.from_numpy(self.y[idx])


class Classify(Objective):
    """A small MLP with dropout (consumes the torch RNG) and an EMA copy updated after each step."""

    def __init__(self, fail_at_step: int | None = None) -> None:
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Linear(5, 16), nn.LayerNorm(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 2)
        )
        self.ema = nn.Sequential(
            nn.Linear(5, 16), nn.LayerNorm(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 2)
        )
        self.ema.load_state_dict(self.net.state_dict())
        self.fail_at_step = fail_at_step
        self.seen_momentum: list[float] = []
        self.n_updates = 0

    def modules(self) -> dict[str, nn.Module]:
        return {"student": self.net, "teacher": self.ema}

    def trainable(self) -> dict[str, nn.Module]:
        return {"student": self.net}

    def schedules(self, total_steps: int, steps_per_epoch: int) -> dict[str, np.ndarray]:
        return {"momentum": np.linspace(0.9, 1.0, total_steps)}

    def train_step(self, batch, ctx: StepContext) -> StepOutput:
        if self.fail_at_step is not None and ctx.step == self.fail_at_step:
            raise KeyboardInterrupt("killed")
        x, y = batch
        logits = ctx.models["student"](x)
        return StepOutput(
            nn.functional.cross_entropy(logits, y), {"acc": float((logits.argmax(1) == y).float().mean())}
        )

    def after_step(self, ctx: StepContext) -> None:
        m = ctx.values["momentum"]
        self.seen_momentum.append(m)
        with torch.no_grad():
            for pt, ps in zip(self.ema.parameters(), self.net.parameters()):
                pt.mul_(m).add_(ps.detach(), alpha=1 - m)
        self.n_updates += 1

    def state_dict(self) -> dict:
        return {"n_updates": self.n_updates}

    def load_state_dict(self, state: dict) -> None:
        self.n_updates = state["n_updates"]


OPT = OptimConfig(
    name="adamw", lr=1e-2, warmup_epochs=1, weight_decay=0.05, weight_decay_end=0.2, accum_steps=2
)


def _fit(
    out: Path | None, fail_at: int | None = None, epochs: int = 3, every: int = 2
) -> tuple[Classify, object]:
    obj = Classify(fail_at)
    cfg = EngineConfig(epochs=epochs, seed=5, out_dir=out, checkpoint_every=every, progress=False)
    return obj, Engine(obj, OPT, cfg, "cpu").fit(Noisy())


def _states(obj: Classify) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": v for n, m in obj.modules().items() for k, v in m.state_dict().items()}


def test_killed_and_resumed_run_equals_uninterrupted(tmp_path: Path) -> None:
    ref, ref_fit = _fit(None)
    # 7 micro-batches, accum 2 -> 4 steps per epoch (last window partial); kill inside epoch 1 after a
    # mid-epoch checkpoint at step 6, then resume in a fresh process-like setting (new objects)
    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path, fail_at=7)
    ckpt = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert ckpt["engine"]["step"] == 6 and ckpt["engine"]["epoch"] == 1 and ckpt["engine"]["micro"] == 4
    torch.manual_seed(999)  # the resumed process starts with another RNG state
    np.random.seed(999)
    res, res_fit = _fit(tmp_path)
    assert res_fit.resumed_from == 6
    a, b = _states(ref), _states(res)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert res.n_updates == ref.n_updates == 12
    assert [r["loss"] for r in res_fit.history] == [r["loss"] for r in ref_fit.history]
    steps = [json.loads(line)["step"] for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert steps == list(range(12))  # redone steps are not logged twice
    csv = (tmp_path / "epochs.csv").read_text().splitlines()
    assert csv[0].startswith("epoch,lr,loss,acc") and len(csv) == 4


def test_finished_run_is_not_retrained(tmp_path: Path) -> None:
    first, _ = _fit(tmp_path)
    again, fit = _fit(tmp_path)
    assert fit.resumed_from == 12 and again.n_updates == 12
    for k, v in _states(first).items():
        assert torch.equal(v, _states(again)[k])


def test_checkpoint_holds_dino_layout(tmp_path: Path) -> None:
    _fit(tmp_path, epochs=1)
    ckpt = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert {"student", "teacher", "optimizer", "epoch", "engine", "config"} <= set(ckpt)
    assert ckpt["epoch"] == 1  # the next epoch to run, as DINO writes it
    assert set(ckpt["teacher"]) == set(Classify().ema.state_dict())


def test_resume_with_other_settings_is_refused(tmp_path: Path) -> None:
    _fit(tmp_path, epochs=1)
    obj = Classify()
    other = OptimConfig(name="adamw", lr=5e-3, accum_steps=2)
    engine = Engine(obj, other, EngineConfig(epochs=2, out_dir=tmp_path, progress=False), "cpu")
    with pytest.raises(
        CheckpointError, match=r"other optimizer settings \(\['lr', 'warmup_epochs', 'weight_decay'"
    ):
        engine.fit(Noisy())


def test_schedules_reach_the_optimizer_and_hooks(tmp_path: Path) -> None:
    obj, fit = _fit(None, epochs=2)
    assert fit.step == 8
    assert obj.seen_momentum == pytest.approx(np.linspace(0.9, 1.0, 8).tolist())
    engine = Engine(Classify(), OPT, EngineConfig(epochs=2, progress=False), "cpu")
    engine.fit(Noisy())
    groups = engine.optimizer.param_groups
    # last step: lr at the end of the cosine (0), weight decay at its end value on the decayed group only
    assert groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert groups[0]["weight_decay"] == pytest.approx(0.2) and groups[1]["weight_decay"] == 0.0


def test_weight_decay_groups_exclude_norms_and_biases() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    decay, no_decay = weight_decay_groups(net, True)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 3]), torch.Size([2, 4])]
    assert len(no_decay["params"]) == 4 and no_decay["wd_scale"] == 0.0
    assert len(weight_decay_groups(net, False)) == 1


class Quadratic(Objective):
    """loss = mean((w * x - y)^2) on scalar data: gradients are easy to compute by hand."""

    def __init__(self) -> None:
        self.lin = nn.Linear(1, 1, bias=False)
        nn.init.constant_(self.lin.weight, 1.0)

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.lin}

    def train_step(self, batch, ctx: StepContext) -> StepOutput:
        x, y = batch
        return StepOutput(((ctx.models["model"](x) - y) ** 2).mean())


def _w(q: Quadratic) -> float:
    return float(q.lin.weight.detach())


class Rows:
    def __init__(self, rows: list[tuple[float, float]], per_batch: int) -> None:
        self.rows, self.k = rows, per_batch

    def __len__(self) -> int:
        return -(-len(self.rows) // self.k)

    def batches(self, epoch: int, start: int = 0):
        for i in range(start, len(self)):
            part = self.rows[i * self.k : (i + 1) * self.k]
            yield torch.tensor([[r[0]] for r in part]), torch.tensor([[r[1]] for r in part])


def test_accumulation_equals_one_large_batch() -> None:
    rows = [(1.0, 2.0), (2.0, 1.0), (3.0, 3.5), (-1.0, 0.5)]
    sgd = {"name": "sgd", "lr": 0.1, "momentum": 0.0, "lr_schedule": "constant"}
    big = Quadratic()
    Engine(big, OptimConfig(**sgd), EngineConfig(epochs=1, progress=False)).fit(Rows(rows, 4))
    acc = Quadratic()
    Engine(acc, OptimConfig(**sgd, accum_steps=4), EngineConfig(epochs=1, progress=False)).fit(Rows(rows, 1))
    # by hand: d/dw mean((w x - y)^2) at w=1 = mean(2 x (x - y)) = (-2 + 4 - 3 + 3) / 4 = 0.5
    assert _w(big) == pytest.approx(1.0 - 0.1 * 0.5)
    assert _w(acc) == pytest.approx(_w(big), rel=1e-6)


def test_partial_last_window_is_averaged_over_its_own_size() -> None:
    rows = [(1.0, 2.0), (2.0, 1.0), (3.0, 3.5)]
    sgd = OptimConfig(name="sgd", lr=0.1, momentum=0.0, lr_schedule="constant", accum_steps=2)
    q = Quadratic()
    fit = Engine(q, sgd, EngineConfig(epochs=1, progress=False)).fit(Rows(rows, 1))
    assert fit.step == 2
    w = 1.0 - 0.1 * ((2 * 1 * (1 - 2)) + (2 * 2 * (2 - 1))) / 2  # first window: rows 0-1
    w = w - 0.1 * (2 * 3 * (3 * w - 3.5))  # second window: row 2 alone, not halved
    assert _w(q) == pytest.approx(w, rel=1e-6)


def test_non_finite_loss_is_reported() -> None:
    q = Quadratic()
    rows = [(float("nan"), 1.0)]
    with pytest.raises(FloatingPointError, match="non-finite loss nan at epoch 0, step 0"):
        Engine(q, OptimConfig(lr=0.1), EngineConfig(epochs=1, progress=False)).fit(Rows(rows, 1))


def test_bad_configs_name_the_field() -> None:
    with pytest.raises(ValueError, match="optimizer must be one of"):
        OptimConfig(name="lamb")
    with pytest.raises(ValueError, match="precision must be one of"):
        EngineConfig(epochs=1, precision="fp8")
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        Engine(Quadratic(), OptimConfig(), EngineConfig(epochs=1, precision="fp16"), "cpu")


def test_bf16_autocast_runs_on_cpu() -> None:
    q = Quadratic()
    fit = Engine(q, OptimConfig(lr=0.1), EngineConfig(epochs=1, precision="bf16", progress=False)).fit(
        Rows([(1.0, 2.0)], 1)
    )
    assert fit.step == 1 and _w(q) != 1.0
