"""Learning-rate schedules precomputed as one value per optimizer step.

A schedule is a plain ``np.ndarray`` of length ``total_steps``; the training loop sets
``group["lr"] = schedule[step]`` before each optimizer step. Precomputing keeps the loop
trivial, makes resumption exact (index by step) and lets tests check the values directly.
"""

from __future__ import annotations

import math

import numpy as np


def cosine_schedule(
    base_value: float,
    final_value: float,
    total_steps: int,
    warmup_steps: int = 0,
    start_warmup_value: float = 0.0,
) -> np.ndarray:
    """Linear warmup from ``start_warmup_value`` to ``base_value``, then cosine decay to ``final_value``.

    Step ``0`` is ``start_warmup_value`` when there is a warmup (else ``base_value``), step
    ``warmup_steps`` is ``base_value`` and the last step is exactly ``final_value`` (a decay of a
    single step stays at ``base_value``).

    Returns:
        (total_steps,) float64 array.
    """
    if total_steps < 0 or warmup_steps < 0:
        raise ValueError(f"steps must be >= 0, got total={total_steps}, warmup={warmup_steps}")
    warmup_steps = min(int(warmup_steps), int(total_steps))
    warm = np.linspace(start_warmup_value, base_value, warmup_steps, endpoint=False)
    n_decay = int(total_steps) - warmup_steps
    if n_decay == 1:  # a single step trains at the peak value (a 1-step run must not be a no-op)
        decay = np.array([base_value], dtype=np.float64)
    else:
        t = np.arange(n_decay, dtype=np.float64) / max(n_decay - 1, 1)
        decay = final_value + 0.5 * (base_value - final_value) * (1.0 + np.cos(math.pi * t))
    out = np.concatenate([warm, decay]).astype(np.float64)
    assert out.shape == (total_steps,)
    return out


def constant_schedule(value: float, total_steps: int, warmup_steps: int = 0) -> np.ndarray:
    """Linear warmup from 0 to ``value`` over ``warmup_steps`` then constant; (total_steps,) array."""
    out = np.full(int(total_steps), float(value), dtype=np.float64)
    w = min(int(warmup_steps), int(total_steps))
    out[:w] = np.linspace(0.0, value, w, endpoint=False)
    return out


def steps_per_epoch(n_bags: int, accum_steps: int) -> int:
    """Optimizer steps in one epoch of ``n_bags`` bags with gradient accumulation (last window partial)."""
    if n_bags < 1 or accum_steps < 1:
        raise ValueError(f"need n_bags >= 1 and accum_steps >= 1, got {n_bags}, {accum_steps}")
    return math.ceil(n_bags / accum_steps)


def lr_schedule(
    kind: str,
    lr: float,
    min_lr: float,
    epochs: int,
    n_steps_per_epoch: int,
    warmup_epochs: float = 0.0,
) -> np.ndarray:
    """Per-step learning rates for ``epochs`` epochs: ``kind`` is ``"cosine"`` or ``"constant"``."""
    total = int(epochs) * int(n_steps_per_epoch)
    warmup = round(float(warmup_epochs) * n_steps_per_epoch)
    if kind == "cosine":
        return cosine_schedule(lr, min_lr, total, warmup_steps=warmup)
    if kind == "constant":
        return constant_schedule(lr, total, warmup_steps=warmup)
    raise ValueError(f"unknown lr schedule {kind!r}; use 'cosine' or 'constant'")
