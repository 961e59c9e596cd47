"""seed_everything makes Python, NumPy and torch draws repeatable."""

from __future__ import annotations

import random

import numpy as np
import torch

from gigaslide.utils.seed import seed_everything


def _draw() -> tuple:
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_same_seed_same_numbers() -> None:
    seed_everything(123)
    a = _draw()
    seed_everything(123)
    assert _draw() == a
    seed_everything(124)
    assert _draw() != a
