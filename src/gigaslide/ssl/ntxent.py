"""SimCLR's NT-Xent loss: normalized temperature-scaled cross-entropy (Chen et al., ICML 2020).

For a batch of N pairs (z1[i], z2[i]) the 2N views are L2-normalised; each view is an anchor whose
positive is the other view of its pair and whose negatives are the 2N - 2 remaining views:

    l(i, j) = -log( exp(sim(i, j) / T) / sum_{k != i} exp(sim(i, k) / T) )

averaged over the 2N anchors. Under torch.distributed the candidates (positives and negatives)
are the views of every rank, gathered with a gradient-carrying all-gather, so each anchor has
2 * world * N - 2 negatives; the anchors stay local, and DDP's gradient averaging makes the
result the mean over all anchors.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(x: torch.Tensor) -> torch.Tensor:
    """(B, D) -> (world * B, D) rank by rank, gradients flowing back to every rank's slice."""
    from gigaslide.utils.collectives import all_gather_with_grad

    return all_gather_with_grad(x)


class NTXentLoss(nn.Module):
    """NT-Xent over 2N views with 2N - 2 negatives each (more across ranks).

    Args:
        temperature: softmax temperature T (SimCLR: 0.1-0.5; Giga-SSL uses 0.1).
    """

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        """Scalar loss for the pairs (z1[i], z2[i]); z1 and z2 are (N, D) projections of two views."""
        if z1.ndim != 2 or z1.shape != z2.shape:
            raise ValueError(f"z1 and z2 must both be (N, D), got {tuple(z1.shape)} and {tuple(z2.shape)}")
        n = z1.shape[0]
        if n < 1:
            raise ValueError("NT-Xent needs at least one pair")
        z1 = F.normalize(z1.float(), dim=1)
        z2 = F.normalize(z2.float(), dim=1)
        anchors = torch.cat([z1, z2])  # (2N, D)
        rank, world = _world()
        if world > 1:
            candidates = torch.cat([_gather(z1), _gather(z2)])  # (2 * world * N, D)
        else:
            candidates = anchors
        if world * n * 2 < 3:
            raise ValueError("NT-Xent needs at least one negative: give at least 2 pairs in total")
        logits = anchors @ candidates.T / self.temperature  # (2N, 2 * world * N)
        i = torch.arange(n, device=z1.device)
        # column of each anchor itself and of its positive among the candidates
        first, second = rank * n + i, world * n + rank * n + i
        self_col = torch.cat([first, second])  # (2N,)
        pos_col = torch.cat([second, first])  # (2N,)
        rows = torch.arange(2 * n, device=z1.device)
        logits = logits.index_put((rows, self_col), torch.tensor(float("-inf"), device=z1.device))
        return F.cross_entropy(logits, pos_col)
