"""CDA, curriculum data augmentation (Yin & Shen 2023, "Dataset Distillation in
Large Data Era"; VILA-Lab/SRe2L/CDA): SRe2L's recover with an easy-to-hard
curriculum on the random resized crop. The crop's minimum scale starts at the
maximum (whole images) and decays to ``crop_scale[0]`` over the first
``milestone`` fraction of the iterations, along a cosine (CDA's default), a
line, or as one step; afterwards it stays at ``crop_scale[0]``. Everything else
is :func:`rd3core.synth.sre2l.recover`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from .base import DistilledSet, register_method
from .sre2l import SRe2LParams, check_bn_teacher, recover


@dataclass(frozen=True)
class CDAParams(SRe2LParams):
    crop: Literal["auto", "rrc", "none"] = "rrc"  # the curriculum acts on the crop, so it is always on
    curriculum: Literal["cosine", "linear", "step"] = "cosine"
    milestone: float = 1.0  # fraction of the iterations over which the minimum scale decays

    def validate(self):
        yield from super().validate()
        if self.crop != "rrc":
            yield "crop", f"CDA's curriculum is on the random resized crop: expected 'rrc', got {self.crop!r}"
        if not 0 < self.milestone <= 1:
            yield "milestone", f"expected 0 < milestone <= 1, got {self.milestone}"


def min_scale(params: CDAParams, t: float) -> float:
    """Crop minimum scale after a fraction ``t`` in [0, 1) of the iterations."""
    low, high = params.crop_scale
    if t >= params.milestone:
        return low
    progress = t / params.milestone
    if params.curriculum == "step":
        return high
    if params.curriculum == "linear":
        return low + (high - low) * (1 - progress)
    return low + (high - low) * 0.5 * (1 + math.cos(math.pi * progress))


@register_method("cda", CDAParams, needs_teacher=True, check=check_bn_teacher, long_loop=True)
def cda(dataset, teacher, params: CDAParams, seed: int, runtime, checkpoint=None, progress=None) -> DistilledSet:
    return recover(dataset, teacher, params, seed, runtime, lambda t: min_scale(params, t), checkpoint, progress)[0]
