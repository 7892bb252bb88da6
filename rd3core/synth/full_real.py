"""The whole real training split, as a "distilled set". The reference point
DD-Ranking's HLR needs (Acc(real, hard labels)) and the upper bound every study
can show. ``ipc`` means "all": it must be left unset (null) and is recorded as
such; the post-evaluation batch-size rule then sees the split's mean images per
class. Nothing is drawn, so every seed shares one artifact."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import DistilledSet, register_method, unseeded_key_inputs


@dataclass(frozen=True)
class FullRealParams:
    ipc: int | None = None  # always null: every training image

    def validate(self):
        if self.ipc is not None:
            yield "ipc", (f"full_real always uses the whole training split; leave ipc unset (null), got {self.ipc} "
                          "(use random_real for a subset)")


@register_method("full_real", FullRealParams, key_inputs=unseeded_key_inputs, baseline=True)
def full_real(dataset, teacher, params: FullRealParams, seed: int, runtime) -> DistilledSet:
    n = len(dataset.train)
    # clone(): a view would serialise its whole base storage into the artifact.
    return DistilledSet(dataset.train.images.clone(), dataset.train.labels.clone(), source_indices=torch.arange(n))
