"""Label sources for post-evaluation. Each is called once per training step with
the batch exactly as the student sees it and returns teacher logits (or None for
hard labels). Teachers always run in eval mode under ``torch.inference_mode``:
no gradients, no BN statistic updates. Stored (FKD-style) labels replay a
precomputed record instead: :mod:`rd3core.stored_labels`.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .augment import AugParams


class TeacherEnsemble(nn.Module):
    """One or more frozen teachers combined into one logit vector per image."""

    def __init__(self, teachers: Sequence[nn.Module], combine: str = "mean"):
        super().__init__()
        self.teachers = nn.ModuleList(teachers)
        self.combine = combine
        for t in self.teachers:
            t.eval()
            t.requires_grad_(False)

    def train(self, mode: bool = True) -> "TeacherEnsemble":
        return super().train(False)  # a teacher never leaves eval mode

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [t(x).float() for t in self.teachers]
        if len(outs) == 1:
            return outs[0]
        stacked = torch.stack(outs)  # [T, N, C]
        if self.combine == "norm_mean":
            # G-VBSM: bring every teacher's logits to the same per-sample L2 norm
            # (their mean) before averaging, so no teacher dominates by scale.
            norms = stacked.norm(dim=2, keepdim=True).clamp_min(1e-6)
            stacked = stacked / norms * norms.mean(0, keepdim=True)
        return stacked.mean(0)


class HardLabels:
    needs_teacher = False

    def __call__(self, x: torch.Tensor, idx: torch.Tensor, params: AugParams, block: int, step: int) -> None:
        return None


class StaticLabels:
    """One teacher output per clean image, computed once; mixed images get the
    same mix of their two images' logits (lam * l_a + (1 - lam) * l_b)."""

    needs_teacher = True

    def __init__(self, teacher: TeacherEnsemble, clean_images: torch.Tensor, batch_size: int = 500):
        with torch.inference_mode():
            self.logits = torch.cat([teacher(clean_images[i:i + batch_size])
                                     for i in range(0, clean_images.shape[0], batch_size)])

    def __call__(self, x: torch.Tensor, idx: torch.Tensor, params: AugParams, block: int, step: int) -> torch.Tensor:
        logits = self.logits[idx.to(self.logits.device)]
        if params.mixed():
            logits = params.mix_lam * logits + (1.0 - params.mix_lam) * logits[params.mix_perm.to(logits.device)]
        return logits


class EpochwiseLabels:
    """The teacher relabels exactly the augmented, mixed batch. With views held
    for several epochs (refresh_every > 1) the loop replays identical batches
    within a block, so their logits are computed once per block and reused."""

    needs_teacher = True

    def __init__(self, teacher: TeacherEnsemble, reuse_within_block: bool = False):
        self.teacher = teacher
        self.reuse = reuse_within_block
        self._block = -1
        self._cache: dict[int, torch.Tensor] = {}

    def __call__(self, x: torch.Tensor, idx: torch.Tensor, params: AugParams, block: int, step: int) -> torch.Tensor:
        if not self.reuse:
            return self.teacher(x)
        if block != self._block:
            self._block, self._cache = block, {}
        if step not in self._cache:
            self._cache[step] = self.teacher(x)
        return self._cache[step]
