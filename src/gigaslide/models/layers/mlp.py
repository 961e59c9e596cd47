"""Transformer feed-forward block and stochastic depth."""

from __future__ import annotations

import torch
from torch import nn


class Mlp(nn.Module):
    """Two linear layers with a GELU in between: D -> hidden -> D (names ``fc1``/``fc2`` as in DINO/timm)."""

    def __init__(self, in_features: int, hidden_features: int | None = None, drop: float = 0.0) -> None:
        super().__init__()
        hidden = int(hidden_features or in_features)
        self.fc1 = nn.Linear(in_features, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., D)."""
        x = self.drop(self.act(self.fc1(x)))
        return self.drop(self.fc2(x))


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a whole residual branch per sample with probability ``p``.

    Kept samples are scaled by ``1 / (1 - p)`` so the expectation is unchanged; identity in eval mode.
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path probability must be in [0, 1), got {p}")
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, ...) -> (B, ...)."""
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = x.new_empty(shape).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"
