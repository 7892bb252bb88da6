"""Distillation losses. Targets are always detached here, whatever the caller
passed, so a teacher can never receive gradients through the loss.

``kind`` says how the student matches soft targets; ``gamma`` adds a hard-label
cross-entropy term (RD3: "KL + gamma*CE" helps in most settings; G-VBSM/EDC use
"MSE + gamma*CE"). With hard labels only (labels.mode == "hard") the objective is
plain cross-entropy on the (mixed) labels and these settings are unused.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from .config import bounded


@dataclass(frozen=True)
class LossSpec:
    kind: Literal["kl", "soft_ce", "mse"] = "kl"
    temperature: float = bounded(4.0, gt=0, le=1000)
    # A linear schedule start -> end over training; None = fixed.
    temperature_end: float | None = bounded(None, gt=0, le=1000)
    t_squared: bool = False  # multiply the KL by T^2 (Hinton); SRe2L/RDED do not
    gamma: float = bounded(0.0, ge=0, le=1000)  # weight of an added hard-label CE term

    def temperature_at(self, progress: float) -> float:
        """Temperature at ``progress`` in [0, 1] of training."""
        if self.temperature_end is None:
            return self.temperature
        return self.temperature + (self.temperature_end - self.temperature) * progress


def hard_ce(student: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor | None, lam: float) -> torch.Tensor:
    """Cross-entropy on labels mixed by CutMix/MixUp (y_b is the partner's label)."""
    loss = F.cross_entropy(student, y_a)
    if y_b is not None and lam < 1.0:
        loss = lam * loss + (1.0 - lam) * F.cross_entropy(student, y_b)
    return loss


def soft_loss(student: torch.Tensor, teacher: torch.Tensor, spec: LossSpec, temperature: float) -> torch.Tensor:
    teacher = teacher.detach().float()
    if teacher.is_inference():
        # Teachers run under inference_mode; autograd may not save such a tensor
        # (MSE keeps its target for backward), so take an ordinary copy.
        teacher = teacher.clone()
    if spec.kind == "mse":
        return F.mse_loss(student, teacher)
    log_p_s = F.log_softmax(student / temperature, dim=1)
    if spec.kind == "kl":
        loss = F.kl_div(log_p_s, F.log_softmax(teacher / temperature, dim=1), reduction="batchmean", log_target=True)
        return loss * temperature**2 if spec.t_squared else loss
    # soft cross-entropy: KL plus the teacher's entropy (same gradients, other scale)
    return -(F.softmax(teacher / temperature, dim=1) * log_p_s).sum(1).mean()


def distill_loss(student: torch.Tensor, teacher: torch.Tensor | None, y_a: torch.Tensor, y_b: torch.Tensor | None,
                 lam: float, spec: LossSpec, temperature: float) -> torch.Tensor:
    if teacher is None:
        return hard_ce(student, y_a, y_b, lam)
    loss = soft_loss(student, teacher, spec, temperature)
    if spec.gamma > 0:
        loss = loss + spec.gamma * hard_ce(student, y_a, y_b, lam)
    return loss
