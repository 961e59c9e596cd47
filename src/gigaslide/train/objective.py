"""What a method gives the training engine: an :class:`Objective`, its :class:`StepOutput`, the
:class:`StepContext` it is handed, and the :class:`EpochData` protocol of its micro-batches.

A method is its modules, its data view and ``train_step``; the loop itself is
:class:`gigaslide.train.engine.Engine`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

NO_DDP = "no-ddp"  # returned by Objective.ddp_group: train this module without DistributedDataParallel


@dataclass
class StepOutput:
    """What an objective returns for one micro-batch."""

    loss: Tensor  # scalar; the engine divides by the window size and backpropagates
    # logged per step, averaged per epoch (and over the ranks under torchrun: the same keys on every rank)
    logs: dict[str, float] = field(default_factory=dict)
    backward_done: bool = False  # the objective already backpropagated through ``ctx.backward``


@dataclass
class StepContext:
    """Where the run stands, handed to every objective call."""

    epoch: int
    step: int  # global optimizer step: the index into every schedule
    micro: int  # micro-batch index inside the epoch
    lr: float
    weight_decay: float
    values: dict[str, float]  # current value of each extra schedule of the objective
    models: dict[str, nn.Module]  # trainable modules as they must be called (DDP-wrapped under torchrun)
    device: torch.device
    autocast: Callable[[], contextlib.AbstractContextManager[Any]]
    world_size: int = 1
    rank: int = 0
    stop: bool = False  # set by ``on_epoch_end`` to end training early
    window: int = 1  # micro-batches in the current accumulation window
    scaler: torch.amp.GradScaler | None = None

    def backward(self, outputs: Tensor, grads: Tensor | None = None) -> None:
        """Backpropagate ``outputs`` (a loss, or tensors with their ``grads``) as the engine would:
        divided by the accumulation window and scaled for fp16. For objectives that run several
        backward passes per micro-batch (gradient caching); return ``StepOutput(..., backward_done=True)``."""
        scale = self.scaler.get_scale() if self.scaler is not None and self.scaler.is_enabled() else 1.0
        if grads is None:
            (outputs * (scale / self.window)).backward()
        else:
            outputs.backward(grads * (scale / self.window))


class Objective:
    """A training method on the engine. Subclasses implement :meth:`modules` and :meth:`train_step`."""

    def modules(self) -> dict[str, nn.Module]:
        """Every module whose state is checkpointed, by name (saved at the top level of the checkpoint)."""
        raise NotImplementedError(f"{type(self).__name__} must define modules()")

    def trainable(self) -> dict[str, nn.Module]:
        """The optimised modules (default: all); under torchrun each is wrapped in DDP."""
        return self.modules()

    def train_step(self, batch: Any, ctx: StepContext) -> StepOutput:
        """Forward and loss of one micro-batch (call trainable modules through ``ctx.models``)."""
        raise NotImplementedError(f"{type(self).__name__} must define train_step()")

    #: ranks hold different trainable modules (e.g. aggregator on rank 0, encoder elsewhere): the
    #: checkpoint then keeps every rank's optimizer state
    rank_specific: bool = False

    def ddp_group(self, module_name: str) -> Any:
        """Process group for the DDP wrapper of a trainable module: None = all ranks, or a subgroup,
        or :data:`NO_DDP` to train it without DDP."""
        return None

    def before_save(self, ctx: StepContext) -> None:
        """Called on every rank before a checkpoint is written (e.g. to gather modules on rank 0)."""

    def param_groups(self, module_name: str, module: nn.Module) -> list[dict[str, Any]] | None:
        """Custom parameter groups of one trainable module (keys ``params`` and optionally ``lr_scale``,
        ``wd_scale``); None = the engine's default split (no decay on norms and biases)."""
        return None

    def schedules(self, total_steps: int, steps_per_epoch: int) -> dict[str, np.ndarray]:
        """Extra per-step arrays (length ``total_steps``), read as ``ctx.values[name]``."""
        return {}

    def on_epoch_start(self, epoch: int, ctx: StepContext) -> None:
        """Called before the first micro-batch of each epoch (also when resuming inside it)."""

    def after_backward(self, ctx: StepContext) -> None:
        """Gradients are ready (unscaled, clipped), the optimizer has not stepped yet."""

    def after_step(self, ctx: StepContext) -> None:
        """After each optimizer step (e.g. a teacher EMA update)."""

    def on_epoch_end(self, epoch: int, ctx: StepContext) -> dict[str, float]:
        """Validation and the like; the returned values are logged. Set ``ctx.stop`` to end early."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Extra state to checkpoint (plain data and tensors)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


class EpochData(Protocol):
    """The micro-batches of a run: ``len`` per epoch, and ``batches(epoch, start)`` from index ``start``.

    ``batches`` must be a pure function of (epoch, index) (derive per-item randomness from
    ``np.random.default_rng([seed, epoch, index])``) so that a resumed run sees the same data.
    """

    def __len__(self) -> int: ...

    def batches(self, epoch: int, start: int = 0) -> Iterator[Any]: ...
