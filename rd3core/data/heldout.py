"""A held-out split of real training images, for choosing an epoch without looking
at the test set (PROTOCOL.md, "Held-out selection")."""
from __future__ import annotations

import hashlib
from dataclasses import replace

import torch

from ..seeding import generator
from .base import Dataset, tensor_digest

# The held-out split is one fixed draw from this seed, the same for every cell and
# study, so that epochs selected on it compare.
HELDOUT_SEED = 0


def train_class_counts(dataset: Dataset) -> list[int]:
    """Training images per class."""
    return torch.bincount(dataset.train.labels, minlength=dataset.info.num_classes).tolist()


def heldout_problem(dataset: Dataset, per_class: int) -> str | None:
    """What is wrong with carving ``per_class`` held-out images per class out of
    ``dataset`` (every class must keep a training image), or None."""
    if per_class < 0:
        return f"expected >= 0, got {per_class}"
    counts = train_class_counts(dataset)
    smallest = min(counts)
    if per_class >= smallest:
        return (f"expected less than {smallest}, the training images of the smallest class "
                f"({dataset.info.name!r} class {counts.index(smallest)}), so every class keeps one; got {per_class}")
    return None


def carve_heldout(dataset: Dataset, per_class: int, seed: int = HELDOUT_SEED) -> Dataset:
    """``dataset`` with ``per_class`` training images of every class moved out of
    ``train`` into ``heldout`` (a class-balanced draw from ``seed``), for choosing
    an epoch without looking at the test set.

    Carve before anything sees the data: teachers, synthesis and post-evaluation
    all given the carved dataset never see a held-out image, so no distilled
    image can be one. ``record["heldout"]`` says what was carved and the
    fingerprint differs from the whole dataset's. ``per_class`` 0 returns
    ``dataset`` itself; every class must keep at least one training image."""
    if dataset.heldout is not None:
        raise ValueError(f"dataset {dataset.info.name!r} already has a held-out split: carve the whole dataset")
    problem = heldout_problem(dataset, per_class)
    if problem:
        raise ValueError(f"heldout_per_class: {problem}")
    if per_class == 0:
        return dataset
    gen = generator(seed, "heldout")
    labels = dataset.train.labels
    picks = []
    for c in range(dataset.info.num_classes):
        members = torch.nonzero(labels == c).flatten()
        picks.append(members[torch.randperm(len(members), generator=gen)[:per_class]])
    held = torch.cat(picks)
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[held] = False
    indices_sha = tensor_digest(held)
    fingerprint = hashlib.sha256(f"{dataset.fingerprint}:heldout:{per_class}:{seed}:{indices_sha}".encode())
    record = {**dataset.record, "fingerprint": fingerprint.hexdigest()[:16],
              "heldout": {"per_class": per_class, "seed": seed, "images": len(held), "train": int(keep.sum()),
                          "indices_sha": indices_sha, "whole_fingerprint": dataset.fingerprint}}
    return replace(dataset, train=dataset.train.subset(torch.nonzero(keep).flatten()),
                   heldout=dataset.train.subset(held), record=record)
