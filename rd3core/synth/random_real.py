"""Random real subset: IPC real training images per class, drawn with a recorded
seed. The baseline every study needs: DD-Ranking found that a random subset
under a method's own recipe roughly matches many published methods."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import bounded
from ..seeding import generator
from .base import DistilledSet, register_method


@dataclass(frozen=True)
class RandomRealParams:
    ipc: int = bounded(10, ge=1, le=100_000)


def class_balanced_indices(labels: torch.Tensor, num_classes: int, ipc: int, gen: torch.Generator) -> torch.Tensor:
    picks = []
    for c in range(num_classes):
        members = torch.nonzero(labels == c).flatten()
        if len(members) < ipc:
            raise ValueError(f"class {c} has {len(members)} training images, fewer than ipc={ipc}")
        picks.append(members[torch.randperm(len(members), generator=gen)[:ipc]])
    return torch.cat(picks)


@register_method("random_real", RandomRealParams, baseline=True)
def random_real(dataset, teacher, params: RandomRealParams, seed: int, runtime) -> DistilledSet:
    idx = class_balanced_indices(dataset.train.labels, dataset.info.num_classes, params.ipc,
                                 generator(seed, "random_real"))
    return DistilledSet(dataset.train.images[idx].clone(), dataset.train.labels[idx].clone(), source_indices=idx)
