"""NT-Xent (SimCLR) against a hand-written formula."""

from __future__ import annotations

import math

import pytest
import torch

from gigaslide.ssl.ntxent import NTXentLoss

torch.set_num_threads(1)


def _reference(z1: torch.Tensor, z2: torch.Tensor, t: float) -> float:
    z = torch.cat([z1, z2]).double()
    z = z / z.norm(dim=1, keepdim=True)
    n2 = z.shape[0]
    n = n2 // 2
    total = 0.0
    for i in range(n2):
        j = (i + n) % n2
        denom = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(n2) if k != i)
        total += -math.log(math.exp(float(z[i] @ z[j]) / t) / denom)
    return total / n2


@pytest.mark.parametrize("t", [0.1, 0.5])
def test_equals_the_formula(t: float) -> None:
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    assert math.isclose(float(NTXentLoss(t)(z1, z2)), _reference(z1, z2, t), rel_tol=1e-5)


def test_scale_invariant_and_symmetric() -> None:
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    loss = NTXentLoss(0.2)
    torch.testing.assert_close(loss(z1, z2), loss(3 * z1, 0.5 * z2))
    torch.testing.assert_close(loss(z1, z2), loss(z2, z1))
    # aligned pairs far from the others give a lower loss than random pairs
    assert float(loss(z1, z1 + 0.01 * z2)) < float(loss(z1, z2))


def test_gradients_and_errors() -> None:
    z1 = torch.randn(3, 4, requires_grad=True)
    z2 = torch.randn(3, 4, requires_grad=True)
    NTXentLoss(0.1)(z1, z2).backward()
    assert z1.grad is not None and z2.grad is not None
    with pytest.raises(ValueError, match="temperature"):
        NTXentLoss(0.0)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        NTXentLoss()(torch.randn(3, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match="negative"):
        NTXentLoss()(torch.randn(1, 4), torch.randn(1, 4))
