"""Herding selection (Welling, ICML 2009; as used for exemplars by iCaRL,
Rebuffi et al. 2017): per class, greedily pick real images whose running mean of
teacher penultimate features stays closest to the class mean feature.

Step k picks the unchosen image x minimising
||mu - (phi(x) + sum of the k-1 chosen features) / k||_2, with phi the
teacher's penultimate features, L2-normalised by default (iCaRL). Deterministic
given the features; the seed only matters when ``candidates_per_class``
subsamples the class first.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import bounded, to_dict
from ..data import as_float
from ..seeding import generator
from .base import DistilledSet, register_method
from .teacher import penultimate_features


@dataclass(frozen=True)
class HerdingParams:
    ipc: int = bounded(10, ge=1, le=100_000)
    candidates_per_class: int | None = bounded(None, le=100_000)  # None: every training image of the class
    normalize: bool = True  # L2-normalise features before herding (iCaRL)

    def validate(self):
        if self.candidates_per_class is not None and self.candidates_per_class < self.ipc:
            yield "candidates_per_class", f"expected >= ipc ({self.ipc}) or null, got {self.candidates_per_class}"


def herd(features: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of ``k`` rows of ``features`` chosen by herding, in pick order."""
    mu = features.mean(0)
    total = torch.zeros_like(mu)
    taken = torch.zeros(len(features), dtype=torch.bool)
    picks = []
    for step in range(1, k + 1):
        dist = torch.linalg.vector_norm(mu - (total + features) / step, dim=1)
        dist[taken] = float("inf")
        i = int(torch.argmin(dist))
        picks.append(i)
        taken[i] = True
        total += features[i]
    return torch.tensor(picks, dtype=torch.long)


def class_features(dataset, teacher, members: torch.Tensor, normalize: bool) -> torch.Tensor:
    x = dataset.info.normalize(as_float(dataset.train.images[members]))
    feats = penultimate_features(teacher, x).cpu()
    return F.normalize(feats, dim=1) if normalize else feats


def herding_key_inputs(params: HerdingParams, seed: int) -> dict:
    # No random draw unless the class is subsampled first.
    out = {"params": to_dict(params)}
    if params.candidates_per_class is not None:
        out["seed"] = seed
    return out


@register_method("herding", HerdingParams, needs_teacher=True, key_inputs=herding_key_inputs,
                 baseline=True)
def herding(dataset, teacher, params: HerdingParams, seed: int, runtime) -> DistilledSet:
    picks = []
    for c in range(dataset.info.num_classes):
        members = torch.nonzero(dataset.train.labels == c).flatten()
        if len(members) < params.ipc:
            raise ValueError(f"herding: class {c} has {len(members)} training images, fewer than ipc={params.ipc}")
        if params.candidates_per_class is not None and len(members) > params.candidates_per_class:
            gen = generator(seed, "herding", c)
            members = members[torch.randperm(len(members), generator=gen)[:params.candidates_per_class]]
        picks.append(members[herd(class_features(dataset, teacher, members, params.normalize), params.ipc)])
    idx = torch.cat(picks)
    return DistilledSet(dataset.train.images[idx].clone(), dataset.train.labels[idx].clone(), source_indices=idx)
