"""Teacher EMA, its momentum schedule, and the gradient hooks of DINO's student update.

* :func:`ema_update`: ``teacher = m * teacher + (1 - m) * student``, parameter by parameter (buffers
  such as BatchNorm statistics are not averaged, as in DINO).
* :func:`momentum_schedule`: the teacher momentum per optimizer step, cosine from ``base`` (0.996)
  to ``final`` (1.0) over the run (``train.schedules.cosine_schedule``).
* :func:`cancel_last_layer_grads`: drops the gradients of the head's ``last_layer`` during the
  first ``freeze_epochs`` epochs (DINO: it stabilises the start of training).
* :func:`clip_gradients_per_param`: DINO's clipping, which scales each parameter's gradient to a
  norm of at most ``clip`` separately (not the global norm).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from gigaslide.train.schedules import cosine_schedule


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel/DataParallel wrapper (itself otherwise)."""
    return (
        module.module
        if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel))
        else module
    )


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """In place: each teacher parameter becomes ``momentum * teacher + (1 - momentum) * student``.

    Both modules must have the same parameters in the same order (the teacher is a copy of the
    student); a mismatch raises instead of averaging the wrong tensors.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
    t_params = list(unwrap(teacher).named_parameters())
    s_params = list(unwrap(student).named_parameters())
    if [n for n, _ in t_params] != [n for n, _ in s_params]:
        raise ValueError(
            "teacher and student have different parameters; the teacher must be a copy of the student"
        )
    for (_, pt), (_, ps) in zip(t_params, s_params):
        if pt.shape != ps.shape:
            raise ValueError(
                f"teacher/student parameter shapes differ: {tuple(pt.shape)} vs {tuple(ps.shape)}"
            )
        pt.mul_(momentum).add_(ps.detach().to(pt.dtype), alpha=1.0 - momentum)


def momentum_schedule(base: float, final: float, epochs: int, steps_per_epoch: int) -> np.ndarray:
    """(epochs * steps_per_epoch,) teacher momentum per optimizer step: cosine from ``base`` to ``final``."""
    return cosine_schedule(base, final, int(epochs) * int(steps_per_epoch))


def cancel_last_layer_grads(model: nn.Module, epoch: int, freeze_epochs: int) -> bool:
    """Set the gradients of every ``last_layer`` parameter to None while ``epoch < freeze_epochs``.

    Returns True when gradients were cancelled. (An optimizer skips parameters whose grad is None.)
    """
    if epoch >= freeze_epochs:
        return False
    for name, p in unwrap(model).named_parameters():
        if "last_layer" in name:
            p.grad = None
    return True


@torch.no_grad()
def clip_gradients_per_param(model: nn.Module, clip: float) -> list[float]:
    """Scale each parameter's gradient so that its L2 norm is at most ``clip``; returns the norms before."""
    norms = []
    for p in unwrap(model).parameters():
        if p.grad is None:
            continue
        norm = p.grad.norm(2)
        norms.append(float(norm))
        coef = clip / (norm + 1e-6)
        if coef < 1:
            p.grad.mul_(coef)
    return norms
