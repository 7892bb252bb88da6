"""What every synthesis method builds on: :class:`DistilledSet`, :class:`Method`,
the method registry and :func:`synthesize`. The method modules import this
module, never the package, so that the package can import them without a circle."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..checkpoint import Checkpoint
from ..config import to_dict
from ..data import Dataset, DatasetInfo
from ..loop import ProgressFn, Runtime
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


Check = Callable[[Any, DatasetInfo, "str | None"], Iterable[tuple[str, str]]]
KeyInputs = Callable[[Any, int], dict]


def default_key_inputs(params: Any, seed: int) -> dict:
    return {"params": to_dict(params), "seed": seed}


def unseeded_key_inputs(params: Any, seed: int) -> dict:
    # For methods whose output does not depend on the seed: every seed of a
    # study shares one artifact.
    return {"params": to_dict(params)}


@dataclass(frozen=True)
class Method:
    name: str
    params: type  # frozen dataclass with at least `ipc`
    run: Callable[[Dataset, nn.Module | None, Any, int, Runtime], DistilledSet]
    version: int = 1  # bump when the output for the same params changes
    needs_teacher: bool = False
    # What the cache key hashes: only what the output depends on (the content
    # of an imported file rather than its path; no seed where none is drawn).
    key_inputs: KeyInputs = default_key_inputs
    # Checks that need the dataset or the teacher's architecture, run when a
    # study is validated, before anything runs; yields (param, message).
    check: Check | None = None
    # A reference point rather than a distillation method (a random or herded
    # subset, the whole real set): the analysis shows it beside the methods,
    # outside their spread and ranks. A study entry's `baseline:` overrides it.
    baseline: bool = False
    # ``run`` takes ``checkpoint`` (rd3core.checkpoint) and ``progress``
    # (rd3core.loop.ProgressFn) keywords: it saves to and resumes from the one and
    # reports its iterations to the other. The methods whose runs are long (SRe2L,
    # CDA); the others have no loop worth saving or watching.
    long_loop: bool = False

    def problems(self, params: Any, info: DatasetInfo, teacher_arch: str | None) -> list[tuple[str, str]]:
        return list(self.check(params, info, teacher_arch)) if self.check is not None else []


METHODS: Registry[Method] = Registry("method")


def register_method(name: str, params: type, *, version: int = 1, needs_teacher: bool = False,
                    key_inputs: KeyInputs = default_key_inputs, check: Check | None = None, baseline: bool = False,
                    long_loop: bool = False):
    def deco(fn):
        METHODS.add(name, Method(name, params, fn, version, needs_teacher, key_inputs, check, baseline, long_loop))
        return fn
    return deco


def synthesize(name: str, dataset: Dataset, teacher: nn.Module | None, params: Any, seed: int,
               runtime: Runtime = Runtime(), checkpoint: Checkpoint | None = None,
               progress: ProgressFn | None = None) -> DistilledSet:
    """Run a registered method and record what RD3 asks to compare besides
    accuracy: wall time and the size of what was produced. A method with a long
    loop saves to and resumes from ``checkpoint`` and reports its iterations to
    ``progress``; the others ignore both."""
    method = METHODS.get(name)
    if method.needs_teacher and teacher is None:
        raise ValueError(f"method {name!r} needs a teacher")
    if teacher is not None:
        teacher = runtime.place(teacher)
    _sync(runtime)
    t0 = time.perf_counter()
    hooks = {"checkpoint": checkpoint, "progress": progress} if method.long_loop else {}
    out = method.run(dataset, teacher, params, seed, runtime, **hooks)
    _sync(runtime)  # CUDA work is asynchronous: time what was done, not what was queued
    wall = time.perf_counter() - t0
    out.images, out.labels = out.images.cpu(), out.labels.cpu()
    out.meta.update({"method": name, "version": method.version, "made_with": {"params": to_dict(params), "seed": seed},
                     "wall_s": wall, **out.nbytes()})
    out.meta["bytes"] = sum(v for k, v in out.meta.items() if k.endswith("_bytes"))
    out.meta["images"] = int(out.labels.shape[0])
    return out


def _sync(runtime: Runtime) -> None:
    if runtime.device.startswith("cuda"):
        torch.cuda.synchronize()


def store_images(images: torch.Tensor, precision: str) -> torch.Tensor:
    """Synthesised [0, 1] images as stored: uint8 by default, what the methods
    publish (8-bit image files) and what the recorded size should measure."""
    images = images.detach().cpu().clamp(0, 1)
    if precision == "uint8":
        return images.mul(255).round_().to(torch.uint8)
    return images.float().contiguous()


def list_methods() -> list[str]:
    return METHODS.names()
