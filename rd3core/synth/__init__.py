"""Synthesis methods: one module each, registered by name.

A method is a :class:`Method`: a frozen params dataclass (which always has
``ipc``), a code ``version`` that enters its cache key, and ``run`` that turns
the real dataset (and the frozen teacher, when it needs one) into a
:class:`DistilledSet`. Every random draw comes from ``seed``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..data import Dataset
from ..loop import Runtime
from ..registry import Registry


@dataclass
class DistilledSet:
    images: torch.Tensor  # [N, C, H, W], uint8 or float32 in [0, 1]
    labels: torch.Tensor  # [N] int64
    # Indices into the real training split the images came from (selection
    # methods); lets a study check overlap with held-out images.
    source_indices: torch.Tensor | None = None
    soft_labels: torch.Tensor | None = None  # optional per-image logits shipped with an imported set
    meta: dict[str, Any] = field(default_factory=dict)  # method, params, wall_s, bytes

    def nbytes(self) -> dict[str, int]:
        out = {"images_bytes": self.images.numel() * self.images.element_size(),
               "labels_bytes": self.labels.numel() * self.labels.element_size()}
        if self.soft_labels is not None:
            out["soft_labels_bytes"] = self.soft_labels.numel() * self.soft_labels.element_size()
        return out

    def state(self) -> dict[str, Any]:
        return {"images": self.images, "labels": self.labels, "source_indices": self.source_indices,
                "soft_labels": self.soft_labels, "meta": self.meta}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "DistilledSet":
        return cls(**state)


@dataclass(frozen=True)
class Method:
    name: str
    params: type  # frozen dataclass with at least `ipc: int`
    run: Callable[[Dataset, nn.Module | None, Any, int, Runtime], DistilledSet]
    version: int = 1  # bump when the output for the same params changes
    needs_teacher: bool = False


METHODS: Registry[Method] = Registry("method")


def register_method(name: str, params: type, *, version: int = 1, needs_teacher: bool = False):
    def deco(fn):
        METHODS.add(name, Method(name, params, fn, version, needs_teacher))
        return fn
    return deco


def synthesize(name: str, dataset: Dataset, teacher: nn.Module | None, params: Any, seed: int,
               runtime: Runtime = Runtime()) -> DistilledSet:
    """Run a registered method and record what RD3 asks to compare besides
    accuracy: wall time and the size of what was produced."""
    method = METHODS.get(name)
    t0 = time.perf_counter()
    out = method.run(dataset, teacher, params, seed, runtime)
    out.meta.update({"method": name, "version": method.version, "wall_s": time.perf_counter() - t0, **out.nbytes()})
    return out


def list_methods() -> list[str]:
    return METHODS.names()


from . import random_real  # noqa: E402,F401  (registers)
