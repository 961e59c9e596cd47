"""DINOLoss against a hand-written formula, with centering and the temperature warm-up."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gigaslide.ssl.dino_loss import DINOLoss, teacher_temp_schedule

torch.set_num_threads(1)


def _reference(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, ncrops: int,
               t_temp: float, s_temp: float) -> float:  # fmt: skip
    """Loop-by-loop cross-entropy over (teacher view i, student view v != i) pairs, per sample."""
    b = teacher.shape[0] // 2
    total, terms = 0.0, 0
    for i in range(2):
        for v in range(ncrops):
            if v == i:
                continue
            per_sample = []
            for n in range(b):
                t = teacher[i * b + n].double()
                s = student[v * b + n].double()
                p = torch.exp((t - center[0].double()) / t_temp)
                p = p / p.sum()
                logq = s / s_temp - torch.logsumexp(s / s_temp, dim=0)
                per_sample.append(float(-(p * logq).sum()))
            total += sum(per_sample) / b
            terms += 1
    return total / terms


def test_loss_and_center_equal_the_formula() -> None:
    g = torch.Generator().manual_seed(0)
    k, b, ncrops = 7, 3, 4
    loss_fn = DINOLoss(k, ncrops, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=3,
                       nepochs=5, student_temp=0.1, center_momentum=0.9)  # fmt: skip
    student = torch.randn(ncrops * b, k, generator=g)
    teacher = torch.randn(2 * b, k, generator=g)
    c0 = torch.randn(1, k, generator=g)
    loss_fn.center.copy_(c0)
    temps = [0.04, 0.055, 0.07, 0.07, 0.07]
    assert np.allclose(loss_fn.teacher_temp_schedule, temps)
    got = loss_fn(student, teacher, epoch=1)
    assert math.isclose(float(got), _reference(student, teacher, c0, ncrops, 0.055, 0.1), rel_tol=1e-5)
    want_center = 0.9 * c0 + 0.1 * teacher.mean(dim=0, keepdim=True)
    torch.testing.assert_close(loss_fn.center, want_center)
    # the next call uses the updated center and the epoch's temperature
    got2 = loss_fn(student, teacher, epoch=4)
    assert math.isclose(
        float(got2), _reference(student, teacher, want_center, ncrops, 0.07, 0.1), rel_tol=1e-5
    )


def test_gradient_flows_to_student_only() -> None:
    loss_fn = DINOLoss(5, 3, 0.04, 0.04, 0, 1)
    student = torch.randn(6, 5, requires_grad=True)
    teacher = torch.randn(4, 5, requires_grad=True)
    loss_fn(student, teacher, 0).backward()
    assert student.grad is not None and float(student.grad.abs().sum()) > 0
    assert teacher.grad is None


def test_center_is_a_checkpointed_buffer() -> None:
    loss_fn = DINOLoss(5, 3, 0.04, 0.04, 0, 1)
    assert list(loss_fn.state_dict()) == ["center"]
    assert loss_fn.center.shape == (1, 5)


def test_bad_input_is_explained() -> None:
    loss_fn = DINOLoss(5, 3, 0.04, 0.04, 0, 2)
    with pytest.raises(ValueError, match="3 and 2 views"):
        loss_fn(torch.randn(7, 5), torch.randn(4, 5), 0)
    with pytest.raises(ValueError, match="warmup_teacher_temp_epochs=30"):
        teacher_temp_schedule(0.04, 0.07, 30, 10)
    with pytest.raises(ValueError, match="global crops"):
        DINOLoss(5, 1, 0.04, 0.04, 0, 2)
