"""Optimizer side of the engine: its config, parameter groups without decay, the per-step schedules.

:class:`OptimConfig` names the optimizer (AdamW, Adam, SGD with momentum), the learning-rate and
weight-decay schedules (precomputed per optimizer step by :func:`make_schedules`), gradient
accumulation and clipping. :func:`weight_decay_groups` leaves norms and biases undecayed, as DINO,
timm and most of the field do. :class:`gigaslide.train.engine.Engine` applies them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from gigaslide.train.schedules import constant_schedule, cosine_schedule, lr_schedule

OPTIMIZERS = ("adamw", "adam", "sgd")


@dataclass
class OptimConfig:
    """Optimizer, schedules and gradient handling of a run."""

    name: str = "adamw"  # "adamw" | "adam" | "sgd"
    lr: float = 1e-4  # peak learning rate (after warm-up)
    min_lr: float = 0.0
    lr_schedule: str = "cosine"  # "cosine" | "constant"
    warmup_epochs: float = 0.0
    weight_decay: float = 0.0
    weight_decay_end: float | None = None  # cosine weight-decay schedule (DINO 0.04 -> 0.4); None = constant
    momentum: float = 0.9  # SGD
    betas: tuple[float, float] = (0.9, 0.999)
    no_decay_norm_bias: bool = True  # no weight decay on 1-D parameters (norms, biases) and ``*.bias``
    accum_steps: int = 1  # micro-batches per optimizer step
    grad_clip: float | None = None

    def __post_init__(self) -> None:
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        checks = [
            (self.name in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}, got {self.name!r}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.lr_schedule in ("cosine", "constant"), "lr_schedule must be 'cosine' or 'constant'"),
            (self.accum_steps >= 1, f"accum_steps must be >= 1, got {self.accum_steps}"),
            (self.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {self.warmup_epochs}"),
            (self.grad_clip is None or self.grad_clip > 0, "grad_clip must be > 0 or None"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"invalid optimizer config: {msg}")


def weight_decay_groups(module: nn.Module, no_decay_norm_bias: bool) -> list[dict[str, Any]]:
    """Parameters of ``module`` split into a decayed group and one without decay (1-D tensors and biases)."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if no_decay_norm_bias and (p.ndim <= 1 or name.endswith(".bias")):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "wd_scale": 1.0}]
    if no_decay:
        groups.append({"params": no_decay, "wd_scale": 0.0})
    return [g for g in groups if g["params"]]


def build_optimizer(groups: list[dict[str, Any]], cfg: OptimConfig) -> torch.optim.Optimizer:
    """The configured optimizer over ``groups`` (learning rate and weight decay are set every step)."""
    if not groups:
        raise ValueError("nothing to optimise: the objective has no trainable parameters")
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def make_schedules(cfg: OptimConfig, epochs: int, steps_per_epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """(lr, weight decay) per optimizer step, each of length ``epochs * steps_per_epoch``."""
    total = epochs * steps_per_epoch
    lrs = lr_schedule(cfg.lr_schedule, cfg.lr, cfg.min_lr, epochs, steps_per_epoch, cfg.warmup_epochs)
    if cfg.weight_decay_end is None:
        wds = constant_schedule(cfg.weight_decay, total)
    else:
        wds = cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, total)
    return lrs, wds
