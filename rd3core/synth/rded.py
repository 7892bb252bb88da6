"""RDED (Sun et al., CVPR 2024, "On the Diversity and Realism of Distilled
Dataset"; LINs-lab/RDED): realistic patches chosen by the teacher, no gradients.

Per class: take ``candidates_per_class`` random real images; from each, take
``crops_per_image`` random resized crops (aspect 1:1, area ``crop_scale``) of
side input/f; score every crop by the teacher's cross-entropy on the true class
with the crop zero-padded (RDED's code) or resized to the input size; keep each
image's best crop, then the IPC * f^2 lowest-CE crops of the class; tile them
f x f into IPC images (crop k*IPC + i goes to slot k of image i, as RDED's
``mix_images``). f = 1 stores the crops themselves.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from .. import augment as aug
from ..config import bounded
from ..data import Dataset, as_float
from ..seeding import generator
from .base import DistilledSet, register_method, store_images
from .teacher import CHUNK, cross_entropy


@dataclass(frozen=True)
class RDEDParams:
    ipc: int = bounded(10, ge=1, le=100_000)
    factor: int | None = bounded(None, ge=1, le=16)  # f; None: 2 at >= 128 px inputs (RDED ImageNet), 1 below (CIFAR, Tiny)
    candidates_per_class: int = bounded(300, ge=1, le=100_000)  # RDED's mipc
    crops_per_image: int = bounded(5, ge=1, le=1000)  # RDED's num_crop
    crop_scale: tuple[float, float] = (0.08, 1.0)  # torchvision's RandomResizedCrop default, as RDED
    score_input: Literal["pad", "resize"] = "pad"  # how an input/f crop is brought to input size for scoring
    precision: Literal["uint8", "float32"] = "uint8"  # stored pixels (RDED publishes 8-bit images)

    def validate(self):
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            yield "crop_scale", f"expected 0 < min <= max <= 1, got {list(self.crop_scale)}"


def factor_for(params: RDEDParams, size: int) -> int:
    return params.factor if params.factor is not None else (2 if size >= 128 else 1)


def random_crops(images: torch.Tensor, k: int, side: int, scale: tuple[float, float], gen: torch.Generator):
    """``k`` square random resized crops of each image, resampled to ``side`` px:
    [k * n, C, side, side], crop j of image i at j * n + i."""
    n, _, h, w = images.shape
    spec = aug.AugmentSpec(crop="rrc", scale=scale, ratio=(1.0, 1.0), flip=False, mix="none")
    x = images.repeat(k, 1, 1, 1)
    crops = aug.apply(x, aug.draw(spec, len(x), h, w, gen), spec)
    if side != h:
        crops = F.interpolate(crops, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    return crops


def to_input_size(patches: torch.Tensor, size: int, how: str) -> torch.Tensor:
    side = patches.shape[-1]
    if side == size:
        return patches
    if how == "resize":
        return F.interpolate(patches, size=(size, size), mode="bilinear", align_corners=False)
    before = (size - side) // 2
    return F.pad(patches, (before, size - side - before, before, size - side - before))


def tile(patches: torch.Tensor, f: int, n: int, size: int) -> torch.Tensor:
    """Patch k * n + i -> row k // f, column k % f of image i; resized to ``size``
    when it is not a multiple of f."""
    c, side = patches.shape[1], patches.shape[-1]
    grid = patches.view(f, f, n, c, side, side).permute(2, 3, 0, 4, 1, 5).reshape(n, c, f * side, f * side)
    if f * side != size:
        grid = F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)
    return grid


@torch.no_grad()
def select_class(dataset: Dataset, teacher, params: RDEDParams, c: int, gen: torch.Generator):
    """The lowest-CE crop of each candidate image of class ``c``, the IPC*f^2
    best of those (ascending CE), their CE and source indices."""
    info = dataset.info
    f = factor_for(params, info.size)
    need = params.ipc * f * f
    members = torch.nonzero(dataset.train.labels == c).flatten()
    if len(members) < need:
        raise ValueError(f"rded: class {c} has {len(members)} training images, fewer than ipc * factor^2 = {need}")
    idx = members[torch.randperm(len(members), generator=gen)[:max(params.candidates_per_class, need)]]
    n, k = len(idx), params.crops_per_image
    images = as_float(dataset.train.images[idx])
    patches = random_crops(images, k, info.size // f, params.crop_scale, gen)  # [k*n, C, s/f, s/f]
    ce = torch.cat([cross_entropy(teacher, info.normalize(to_input_size(part, info.size, params.score_input)),
                                  torch.full((len(part),), c)).cpu()
                    for part in patches.split(CHUNK)]).view(k, n)
    best = ce.argmin(0)  # each image's best crop
    ce_best = ce[best, torch.arange(n)]
    rank = torch.argsort(ce_best, stable=True)[:need]
    chosen = patches.view(k, n, *patches.shape[1:])[best[rank], rank]
    return chosen, ce_best[rank], idx[rank]


def rded_select(dataset: Dataset, teacher, params: RDEDParams, seed: int) -> tuple[DistilledSet, torch.Tensor]:
    """The distilled set and the teacher CE of every selected crop (class-major)."""
    info = dataset.info
    f = factor_for(params, info.size)
    images, labels, sources, scores = [], [], [], []
    for c in range(info.num_classes):
        chosen, ce, src = select_class(dataset, teacher, params, c, generator(seed, "rded", c))
        images.append(store_images(tile(chosen, f, params.ipc, info.size), params.precision))
        labels.append(torch.full((params.ipc,), c, dtype=torch.long))
        sources.append(src.view(f * f, params.ipc).t() if f > 1 else src)
        scores.append(ce)
    meta = {"factor": f, "selected_ce_mean": float(torch.cat(scores).mean())}
    return DistilledSet(torch.cat(images), torch.cat(labels), source_indices=torch.cat(sources), meta=meta), \
        torch.cat(scores)


@register_method("rded", RDEDParams, needs_teacher=True)
def rded(dataset, teacher, params: RDEDParams, seed: int, runtime) -> DistilledSet:
    return rded_select(dataset, teacher, params, seed)[0]
