"""The DINO self-distillation loss with centering and a teacher-temperature warm-up (Caron et al., 2021).

For teacher outputs ``t`` of the 2 global views and student outputs ``s`` of all ``ncrops`` views
(each (B, K) chunk in the order of the crops), the loss is the mean over the pairs (teacher view
``i``, student view ``v``) with ``v != i`` of

    mean_b  sum_k  -softmax((t_i - c) / tau_t)[b, k] * log_softmax(s_v / tau_s)[b, k]

where ``tau_t`` follows a linear warm-up per epoch and ``c`` (the buffer ``center``, (1, K)) is an
exponential moving average of the teacher's batch mean, averaged over all ranks, updated after the
loss is computed. DINO checkpoints save this module's state as ``dino_loss`` (``{"center": ...}``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def teacher_temp_schedule(
    warmup_teacher_temp: float, teacher_temp: float, warmup_teacher_temp_epochs: int, nepochs: int
) -> np.ndarray:
    """(nepochs,) teacher temperature per epoch: linear from warm-up to final, then constant (DINO)."""
    if not 0 <= warmup_teacher_temp_epochs <= nepochs:
        raise ValueError(
            f"warmup_teacher_temp_epochs={warmup_teacher_temp_epochs} must be between 0 and the number of "
            f"epochs ({nepochs}); lower it for short runs"
        )
    return np.concatenate(
        (
            np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
            np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp,
        )
    )


class DINOLoss(nn.Module):
    """Cross-entropy between centred, sharpened teacher and student distributions over all view pairs.

    Args:
        out_dim: number of prototypes K.
        ncrops: views per image given to the student (2 global + local ones).
        warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs: teacher temperature
            schedule (linear over the warm-up epochs, then constant).
        student_temp: student temperature.
        center_momentum: EMA momentum of the center.
    """

    center: torch.Tensor

    def __init__(
        self,
        out_dim: int,
        ncrops: int,
        warmup_teacher_temp: float,
        teacher_temp: float,
        warmup_teacher_temp_epochs: int,
        nepochs: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
    ) -> None:
        super().__init__()
        if ncrops < 2:
            raise ValueError(f"DINO needs at least the 2 global crops, got ncrops={ncrops}")
        self.student_temp = float(student_temp)
        self.center_momentum = float(center_momentum)
        self.ncrops = int(ncrops)
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_temp_schedule = teacher_temp_schedule(
            warmup_teacher_temp, teacher_temp, int(warmup_teacher_temp_epochs), int(nepochs)
        )

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int) -> torch.Tensor:
        """Loss of one batch; updates ``center`` from ``teacher_output`` afterwards.

        Args:
            student_output: (ncrops * B, K), views stacked crop by crop.
            teacher_output: (2 * B, K), the two global views.
            epoch: index into the teacher temperature schedule.
        """
        if student_output.shape[0] % self.ncrops or teacher_output.shape[0] * self.ncrops != (
            2 * student_output.shape[0]
        ):
            raise ValueError(
                f"student output {tuple(student_output.shape)} and teacher output "
                f"{tuple(teacher_output.shape)} do not hold {self.ncrops} and 2 views of one batch"
            )
        student_out = (student_output / self.student_temp).chunk(self.ncrops)
        temp = float(self.teacher_temp_schedule[epoch])
        teacher_out = F.softmax((teacher_output - self.center) / temp, dim=-1).detach().chunk(2)

        total = student_output.new_zeros(())
        n_terms = 0
        for iq, q in enumerate(teacher_out):
            for v, s in enumerate(student_out):
                if v == iq:
                    continue  # never the same view for teacher and student
                total = total + torch.sum(-q * F.log_softmax(s, dim=-1), dim=-1).mean()
                n_terms += 1
        total = total / n_terms
        self.update_center(teacher_output)
        return total

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """EMA of the teacher batch mean, the mean taken over every rank's batch."""
        batch_center = torch.sum(teacher_output.float(), dim=0, keepdim=True)  # (1, K)
        world = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_center)
            world = dist.get_world_size()
        batch_center = batch_center / (len(teacher_output) * world)
        self.center.mul_(self.center_momentum).add_(batch_center * (1 - self.center_momentum))
