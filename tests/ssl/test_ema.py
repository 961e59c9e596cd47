"""Teacher EMA, momentum schedule, last-layer freezing and DINO's per-parameter clipping."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from gigaslide.ssl.dino_head import DINOHead
from gigaslide.ssl.ema import cancel_last_layer_grads, clip_gradients_per_param, ema_update, momentum_schedule

torch.set_num_threads(1)


def test_ema_update_equals_the_formula() -> None:
    torch.manual_seed(0)
    student = DINOHead(6, 10, hidden_dim=8, bottleneck_dim=4)
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(torch.randn_like(p))
    before = {n: p.clone() for n, p in teacher.named_parameters()}
    ema_update(teacher, student, 0.9)
    for n, p in teacher.named_parameters():
        torch.testing.assert_close(p, 0.9 * before[n] + 0.1 * dict(student.named_parameters())[n])
    with pytest.raises(ValueError, match="momentum"):
        ema_update(teacher, student, 1.5)
    with pytest.raises(ValueError, match="copy of the student"):
        ema_update(torch.nn.Linear(2, 2), student, 0.5)


def test_momentum_schedule_is_cosine_from_base_to_one() -> None:
    m = momentum_schedule(0.996, 1.0, epochs=2, steps_per_epoch=5)
    t = np.arange(10) / 9
    np.testing.assert_allclose(m, 1.0 + 0.5 * (0.996 - 1.0) * (1 + np.cos(np.pi * t)))
    assert m[0] == pytest.approx(0.996) and m[-1] == pytest.approx(1.0)


def test_last_layer_grads_cancelled_only_in_frozen_epochs() -> None:
    head = DINOHead(6, 10, hidden_dim=8, bottleneck_dim=4, norm_last_layer=False)
    head(torch.randn(3, 6)).sum().backward()
    assert cancel_last_layer_grads(head, epoch=0, freeze_epochs=1)
    assert head.last_layer.weight_v.grad is None and head.last_layer.weight_g.grad is None
    assert head.mlp[0].weight.grad is not None
    head(torch.randn(3, 6)).sum().backward()
    assert not cancel_last_layer_grads(head, epoch=1, freeze_epochs=1)
    assert head.last_layer.weight_v.grad is not None


def test_per_parameter_clipping() -> None:
    a = torch.nn.Parameter(torch.zeros(4))
    b = torch.nn.Parameter(torch.zeros(2))
    a.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])  # norm 5 -> scaled to 1
    b.grad = torch.tensor([0.3, 0.4])  # norm 0.5 -> unchanged
    mod = torch.nn.Module()
    mod.a, mod.b = a, b
    norms = clip_gradients_per_param(mod, 1.0)
    assert norms == pytest.approx([5.0, 0.5])
    torch.testing.assert_close(
        a.grad, torch.tensor([0.6, 0.8, 0.0, 0.0]) * (1.0 / (1.0 + 1e-6 / 5.0)), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(b.grad, torch.tensor([0.3, 0.4]))
