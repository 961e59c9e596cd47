"""The training engine: one method-neutral loop that every gigaslide method plugs into.

A method is an :class:`Objective` (its modules and ``train_step(batch, ctx) -> StepOutput``) plus an
:class:`EpochData` (its micro-batches); the engine owns the rest::

    engine = Engine(objective, OptimConfig(name="adamw", lr=5e-4, weight_decay=0.04,
                                           weight_decay_end=0.4, warmup_epochs=10),
                    EngineConfig(epochs=100, out_dir="runs/dino", precision="bf16"), device)
    result = engine.fit(data)

* optimizer (AdamW, Adam, SGD with momentum) over parameter groups, norms and biases without weight decay;
* per-step schedules precomputed as arrays (learning rate, weight decay, the objective's own, e.g.
  teacher momentum), indexed by the global optimizer step;
* gradient accumulation (``accum_steps`` micro-batches per step, a partial last window), clipping;
* AMP autocast (bf16, or fp16 with a gradient scaler) on CUDA;
* DistributedDataParallel under torchrun for each trainable module (gradient sync on the last
  micro-batch of a window only); one process without torchrun;
* exact resume: modules, optimizer, scaler, step/epoch/micro-batch position, RNG states and the
  objective's own state are checkpointed atomically, so a run killed and resumed ends with the same
  weights as an uninterrupted one (``EpochData.batches`` must be a pure function of (epoch, index));
* per-step JSONL and per-epoch CSV logs (and TensorBoard when installed), a progress bar per epoch;
  under torchrun rank 0 writes them, with each step log averaged over the ranks.

The objective side of the contract (:class:`Objective`, :class:`StepContext`, :class:`StepOutput`,
:class:`EpochData`) lives in :mod:`gigaslide.train.objective` and is re-exported here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from gigaslide.train.checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    load_training_state,
    rng_state,
    save_training_state,
    set_rng_state,
)
from gigaslide.train.objective import NO_DDP, EpochData, Objective, StepContext, StepOutput
from gigaslide.train.optim import OptimConfig, build_optimizer, make_schedules, weight_decay_groups
from gigaslide.utils.atomic import atomic_write_text
from gigaslide.utils.dist import mean_over_ranks

log = logging.getLogger(__name__)

__all__ = [
    "NO_DDP", "Engine", "EngineConfig", "EpochData", "FitResult", "Objective", "OptimConfig",
    "StepContext", "StepOutput", "build_optimizer", "make_schedules", "weight_decay_groups",
]  # fmt: skip

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class EngineConfig:
    """Length, precision, checkpointing and logging of a run."""

    epochs: int
    seed: int = 0
    precision: str = "fp32"  # "fp32" | "bf16" | "fp16" (autocast on CUDA; fp16 with a gradient scaler)
    out_dir: str | Path | None = None  # checkpoint.pth, steps.jsonl, epochs.csv (atomic writes)
    checkpoint_every: int = 0  # also checkpoint every N optimizer steps (0 = only at epoch ends)
    resume: bool = True  # continue from out_dir/checkpoint.pth when it exists
    progress: bool = True  # a progress bar per epoch (loss, rate) on rank 0
    tensorboard: bool = True  # also log to out_dir/tensorboard when tensorboard is installed
    description: str = "train"  # progress-bar label

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"invalid engine config: epochs must be >= 1, got {self.epochs}")
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"invalid engine config: precision must be one of {PRECISIONS}, got {self.precision!r}"
            )


@dataclass
class FitResult:
    """What :meth:`Engine.fit` did."""

    history: list[dict[str, float]]  # one row per epoch: epoch, lr, step logs averaged, on_epoch_end values
    step: int  # optimizer steps taken in total
    stopped_early: bool
    resumed_from: int | None = None  # the optimizer step the run resumed from, if it did


def _autocast_factory(
    device: torch.device, precision: str
) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if device.type != "cuda" and precision == "fp16":
        raise ValueError("precision fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


class Engine:
    """Runs an :class:`Objective` over :class:`EpochData`; see the module docstring."""

    def __init__(
        self,
        objective: Objective,
        optim: OptimConfig,
        cfg: EngineConfig,
        device: torch.device | str = "cpu",
    ) -> None:
        self.objective = objective
        self.optim_cfg = optim
        self.cfg = cfg
        self.device = torch.device(device)
        self.out_dir = Path(cfg.out_dir) if cfg.out_dir is not None else None
        self.world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.rank = dist.get_rank() if self.world > 1 else 0
        modules = objective.modules()
        trainable = objective.trainable()
        unknown = sorted(set(trainable) - set(modules))
        if unknown:
            raise ValueError(f"{type(objective).__name__}: trainable modules {unknown} are not in modules()")
        for m in modules.values():
            m.to(self.device)
        self.models = {name: self._wrap(m, objective.ddp_group(name)) for name, m in trainable.items()}
        groups: list[dict[str, Any]] = []
        for name, m in trainable.items():
            custom = objective.param_groups(name, m)
            groups += custom if custom is not None else weight_decay_groups(m, optim.no_decay_norm_bias)
        self.params = [p for g in groups for p in g["params"]]
        self.optimizer = build_optimizer(groups, optim)
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=cfg.precision == "fp16" and self.device.type == "cuda"
        )
        self.autocast = _autocast_factory(self.device, cfg.precision)

    def _wrap(self, module: nn.Module, group: Any) -> nn.Module:
        if self.world == 1 or group is NO_DDP or not any(p.requires_grad for p in module.parameters()):
            return module
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = None
        if self.device.type == "cuda":
            ids = [self.device.index if self.device.index is not None else torch.cuda.current_device()]
        return DDP(module, device_ids=ids, process_group=group)

    # ------------------------------------------------------------------ checkpoints
    def _config_dict(self) -> dict[str, Any]:
        eng = asdict(self.cfg)
        eng["out_dir"] = str(eng["out_dir"]) if eng["out_dir"] is not None else None
        return {"optim": asdict(self.optim_cfg), "engine": eng}

    def _save(
        self,
        epoch: int,
        micro: int,
        step: int,
        history: list[dict[str, float]],
        sums: dict[str, tuple[float, int]] | None = None,
    ) -> None:
        if self.out_dir is None:
            return
        self.objective.before_save(self._ctx)
        rngs = [rng_state()]
        optimizers = None
        if self.world > 1:
            rngs = [None] * self.world
            dist.all_gather_object(rngs, rng_state())
            if self.objective.rank_specific:
                optimizers = [None] * self.world
                dist.all_gather_object(optimizers, self.optimizer.state_dict())
        if self.rank != 0:
            return
        payload: dict[str, Any] = {name: m.state_dict() for name, m in self.objective.modules().items()}
        payload.update(
            optimizer=self.optimizer.state_dict(),
            epoch=epoch,
            engine={
                "step": step,
                "epoch": epoch,
                "micro": micro,
                "scaler": self.scaler.state_dict(),
                "rng": rngs,
                "objective": self.objective.state_dict(),
                "history": history,
                "epoch_sums": {k: [v, n] for k, (v, n) in (sums or {}).items()},
                "world_size": self.world,
                "optimizers": optimizers,
            },
            config=self._config_dict(),
        )
        save_training_state(self.out_dir / CHECKPOINT_NAME, payload)

    def _load(self, path: Path) -> dict[str, Any]:
        ckpt = load_training_state(path)
        old = ckpt.get("config", {}).get("optim", {})
        now = self._config_dict()["optim"]
        diff = sorted(k for k in now if k in old and _norm(old[k]) != _norm(now[k]))
        if diff:
            raise CheckpointError(
                f"{path} was written with other optimizer settings ({diff}); use a new --out folder to start a "
                "new run, or the same settings to resume"
            )
        modules = self.objective.modules()
        missing = sorted(set(modules) - set(ckpt))
        if missing:
            raise CheckpointError(
                f"{path} has no state for module(s) {missing}; it belongs to another method"
            )
        for name, m in modules.items():
            m.load_state_dict(ckpt[name], strict=True)
        eng = ckpt["engine"]
        per_rank = eng.get("optimizers")
        if self.objective.rank_specific and self.world > 1:
            if not per_rank or len(per_rank) != self.world:
                raise CheckpointError(
                    f"{path} was written by another number of processes; resume with {len(per_rank or [])}"
                )
            self.optimizer.load_state_dict(per_rank[self.rank])
        else:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(eng["scaler"])
        self.objective.load_state_dict(eng.get("objective", {}))
        rngs = eng["rng"]
        set_rng_state(rngs[self.rank] if len(rngs) == self.world else rngs[0])
        if len(rngs) != self.world:
            log.warning(
                "%s was written by %d process(es), resuming with %d: data order and RNG streams "
                "differ from an uninterrupted run",
                path,
                len(rngs),
                self.world,
            )
        return eng

    # ------------------------------------------------------------------ logging
    def _log_step(self, record: dict[str, Any]) -> None:
        if self.rank != 0 or self.out_dir is None:
            return
        with open(self.out_dir / "steps.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k not in ("epoch", "step") and isinstance(v, (int, float)):
                    self._tb.add_scalar(f"step/{k}", v, record["step"])

    def _truncate_step_log(self, step: int) -> None:
        """Drop step records beyond the checkpoint a run resumes from (they will be redone)."""
        path = self.out_dir / "steps.jsonl" if self.out_dir is not None else None
        if self.rank != 0 or path is None or not path.exists():
            return
        keep = [
            ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) < step
        ]
        atomic_write_text(path, "".join(ln + "\n" for ln in keep))

    def _write_epochs(self, history: list[dict[str, float]]) -> None:
        if self.rank != 0 or self.out_dir is None or not history:
            return
        keys: list[str] = []
        for row in history:
            keys += [k for k in row if k not in keys]
        lines = [",".join(keys)] + [",".join(_csv(row.get(k)) for k in keys) for row in history]
        atomic_write_text(self.out_dir / "epochs.csv", "\n".join(lines) + "\n")
        if self._tb is not None:
            for k, v in history[-1].items():
                if k != "epoch" and isinstance(v, (int, float)):
                    self._tb.add_scalar(f"epoch/{k}", v, history[-1]["epoch"])

    def _open_tensorboard(self) -> Any:
        if self.rank != 0 or self.out_dir is None or not self.cfg.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
        return SummaryWriter(str(self.out_dir / "tensorboard"))

    # ------------------------------------------------------------------ the loop
    def fit(self, data: EpochData) -> FitResult:
        """Train for ``cfg.epochs`` epochs over ``data`` (resuming from ``out_dir`` when possible)."""
        n_micro = len(data)
        if n_micro < 1:
            raise ValueError("the training data is empty: no micro-batch to train on")
        accum = self.optim_cfg.accum_steps
        spe = math.ceil(n_micro / accum)
        epochs = self.cfg.epochs
        total = epochs * spe
        lrs, wds = make_schedules(self.optim_cfg, epochs, spe)
        extra = self.objective.schedules(total, spe)
        for name, arr in extra.items():
            if len(arr) != total:
                raise ValueError(f"schedule {name!r} has {len(arr)} values for {total} optimizer steps")
        if self.out_dir is not None and self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self._tb = self._open_tensorboard()
        torch.manual_seed(self.cfg.seed)
        start_epoch, start_micro, step, history, resumed = 0, 0, 0, [], None
        sums: dict[str, tuple[float, int]] = {}
        ckpt_path = self.out_dir / CHECKPOINT_NAME if self.out_dir is not None else None
        if self.cfg.resume and ckpt_path is not None and ckpt_path.exists():
            eng = self._load(ckpt_path)
            start_epoch, start_micro, step, history = eng["epoch"], eng["micro"], eng["step"], eng["history"]
            resumed = step
            sums = {k: (float(v), int(n)) for k, (v, n) in eng.get("epoch_sums", {}).items()}
            self._truncate_step_log(step)
            log.info("resuming %s at epoch %d, step %d", ckpt_path, start_epoch, step)
        ctx = StepContext(
            epoch=start_epoch, step=step, micro=start_micro, lr=float(lrs[min(step, total - 1)]),
            weight_decay=float(wds[min(step, total - 1)]), values={}, models=self.models, device=self.device,
            autocast=self.autocast, world_size=self.world, rank=self.rank, scaler=self.scaler,
        )  # fmt: skip
        self._ctx = ctx
        stopped = False
        try:
            for epoch in range(start_epoch, epochs):
                ctx.epoch = epoch
                for m in self.models.values():
                    m.train()
                self.objective.on_epoch_start(epoch, ctx)
                step, sums = self._run_epoch(
                    data, epoch, start_micro, step, n_micro, lrs, wds, extra, ctx, history, sums
                )
                start_micro = 0
                row: dict[str, float] = {"epoch": epoch, "lr": ctx.lr}
                row.update({k: v / max(n, 1) for k, (v, n) in sums.items()})
                sums = {}
                row.update(self.objective.on_epoch_end(epoch, ctx))
                history.append(row)
                self._write_epochs(history)
                self._save(epoch + 1, 0, step, history)
                if ctx.stop:
                    stopped = epoch + 1 < epochs
                    break
        finally:
            if self._tb is not None:
                self._tb.close()
        return FitResult(history=history, step=step, stopped_early=stopped, resumed_from=resumed)

    def _run_epoch(
        self,
        data: EpochData,
        epoch: int,
        start_micro: int,
        step: int,
        n_micro: int,
        lrs: np.ndarray,
        wds: np.ndarray,
        extra: dict[str, np.ndarray],
        ctx: StepContext,
        history: list[dict[str, float]],
        sums: dict[str, tuple[float, int]],
    ) -> tuple[int, dict[str, tuple[float, int]]]:
        accum = self.optim_cfg.accum_steps
        sums = dict(sums)  # running (sum, count) of each step log over the epoch, carried across a resume
        bar = self._progress(epoch, n_micro, start_micro)
        t0, seen = time.perf_counter(), 0
        for micro, batch in enumerate(data.batches(epoch, start_micro), start=start_micro):
            if micro >= n_micro:
                raise ValueError(f"EpochData.batches yielded more than its len() = {n_micro} micro-batches")
            window_start = (micro // accum) * accum
            window = min(accum, n_micro - window_start)
            last_of_window = micro == window_start + window - 1
            ctx.micro, ctx.step, ctx.window = micro, step, window
            ctx.lr, ctx.weight_decay = float(lrs[step]), float(wds[step])
            ctx.values = {k: float(v[step]) for k, v in extra.items()}
            if micro == window_start:
                for g in self.optimizer.param_groups:
                    g["lr"] = ctx.lr * g.get("lr_scale", 1.0)
                    g["weight_decay"] = ctx.weight_decay * g.get("wd_scale", 1.0)
                self.optimizer.zero_grad(set_to_none=True)
            sync = contextlib.ExitStack()
            if not last_of_window:
                for m in self.models.values():
                    if hasattr(m, "no_sync"):
                        sync.enter_context(m.no_sync())
            with sync:
                out = self.objective.train_step(batch, ctx)
                loss = out.loss
                if not torch.isfinite(loss.detach()):
                    raise FloatingPointError(
                        f"non-finite loss {float(loss.detach())} at epoch {epoch}, step {step}: lower the learning "
                        "rate, check the inputs for NaN, or use precision fp32"
                    )
                if not out.backward_done:
                    ctx.backward(loss)
            logs = {"loss": float(loss.detach()), **out.logs}
            if not self.objective.rank_specific:  # the global batch's values, as one process logs them
                logs = mean_over_ranks(logs, self.device)
            for k, v in logs.items():
                s, n = sums.get(k, (0.0, 0))
                sums[k] = (s + float(v), n + 1)
            if last_of_window:
                self.scaler.unscale_(self.optimizer)
                if self.optim_cfg.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(self.params, self.optim_cfg.grad_clip)
                self.objective.after_backward(ctx)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.objective.after_step(ctx)
                self._log_step({"epoch": epoch, "step": step, "lr": ctx.lr, **logs})
                step += 1
                if (
                    self.cfg.checkpoint_every
                    and step % self.cfg.checkpoint_every == 0
                    and micro + 1 < n_micro
                ):
                    self._save(epoch, micro + 1, step, history, sums)
            seen += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)
        if bar is not None:
            bar.close()
        log.debug("epoch %d: %d micro-batches in %.1fs", epoch, seen, time.perf_counter() - t0)
        return step, sums

    def _progress(self, epoch: int, n_micro: int, start: int) -> Any:
        if not self.cfg.progress or self.rank != 0:
            return None
        from tqdm.auto import tqdm

        return tqdm(
            total=n_micro, initial=start, desc=f"{self.cfg.description} epoch {epoch + 1}/{self.cfg.epochs}",
            leave=False, unit="batch", dynamic_ncols=True,
        )  # fmt: skip


def _norm(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _csv(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)
