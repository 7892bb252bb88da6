"""Stored (FKD-style) soft labels: the `labels` stage between synthesis and
post-evaluation.

For every block of epochs (one epoch, or ``labels.refresh_every`` epochs) and
every step, :func:`precompute` records the sample order, the augmentation
parameters (crop boxes, flips, patch permutations, mix partners, lambdas and
boxes) and the teacher's logits on exactly that view, in fp16 by default and
optionally only the top-k. Post-evaluation replays them (:class:`StoredLabeler`):
the loop takes the order and the views from the record instead of drawing them.

The record carries a signature of everything it depends on (distilled set,
batch size, seed, epochs, augmentation, teachers, ...). A post-evaluation whose
protocol differs is refused with :class:`StoredLabelsMismatch` naming every
difference: the field's FKD code silently misaligns labels and views instead.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from .augment import AugParams
from .config import to_dict
from .data import DatasetInfo, tensor_digest
from .labels import TeacherEnsemble
from .loop import ProgressFn, Runtime, Views, draw_views, make_batch, num_steps
from .protocol import Protocol

FORMAT_VERSION = 1
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


class StoredLabelsMismatch(ValueError):
    """Stored labels were made for another protocol or distilled set."""


def teacher_digest(model: nn.Module) -> str:
    return tensor_digest(*model.state_dict().values())


def protocol_params(protocol: Protocol) -> dict[str, Any]:
    """The protocol fields stored labels depend on: the labels stage's cache key
    (with the seed, distilled set and teachers) and part of their signature.
    Student, optimiser, schedule, loss kind, EMA and evaluation are not."""
    spec = protocol.labels
    return {
        "epochs": protocol.epochs,
        "batch_size": protocol.batch_size,
        "augment": to_dict(protocol.augment),
        "refresh_every": spec.refresh_every,
        "label_teachers": list(spec.teachers),
        "combine": spec.combine,
        "topk": spec.topk,
        "precision": spec.precision,
        # Top-k spreads the remaining mass at this temperature (see _compress).
        "smoothing_temperature": protocol.loss.temperature if spec.topk is not None else None,
    }


def signature(protocol: Protocol, images: torch.Tensor, labels: torch.Tensor, info: DatasetInfo,
              teachers: Mapping[str, nn.Module], *, batch_size: int, seed: int) -> dict[str, Any]:
    """Everything the stored labels depend on; two post-evaluations may share a
    record exactly when their signatures are equal."""
    out = protocol_params(protocol)
    del out["label_teachers"]  # the teachers themselves are compared below
    out.update({
        "format": FORMAT_VERSION,
        "distilled": tensor_digest(images, labels),
        "num_images": int(labels.shape[0]),
        "image_hw": list(images.shape[-2:]),
        "dataset": info.name,  # its normalisation is part of the teacher's input
        "batch_size": int(batch_size),  # resolved (RDED's rule gives an int here)
        "seed": int(seed),
        "teachers": {name: teacher_digest(model) for name, model in teachers.items()},
    })
    return out


def _differences(stored: dict, expected: dict) -> list[str]:
    out = []
    for key in sorted(set(stored) | set(expected)):
        a, b = stored.get(key, "<absent>"), expected.get(key, "<absent>")
        if key == "teachers":
            # Only teachers supplied to the check are compared: a replay needs none.
            if sorted(a) != sorted(b):
                out.append(f"teachers: stored {sorted(a)}, this run {sorted(b)}")
            else:
                out += [f"teachers.{n}: weights differ (stored {a[n]}, this run {b[n]})"
                        for n in sorted(a) if b[n] is not None and a[n] != b[n]]
        elif key == "augment" and isinstance(a, dict) and isinstance(b, dict):
            out += [f"augment.{k}: stored {a.get(k)!r}, this run {b.get(k)!r}"
                    for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            out.append(f"{key}: stored {a!r}, this run {b!r}")
    return out


@dataclass
class StoredLabels:
    signature: dict[str, Any]
    # Per block: {"order": int32 [N], "params": [AugParams.state() per step],
    # "logits": [N, C] or "values"/"indices" [N, k] + "rest" [N]}, rows in step order.
    blocks: list[dict[str, Any]]
    num_classes: int
    meta: dict[str, Any] = field(default_factory=dict)

    def nbytes(self) -> dict[str, int]:
        total = logits = 0
        for block in self.blocks:
            for key in ("order", "logits", "values", "indices", "rest"):
                t = block.get(key)
                if t is not None:
                    size = t.numel() * t.element_size()
                    total += size
                    logits += size if key != "order" else 0
            total += sum(AugParams.from_state(p).nbytes() for p in block["params"])
        return {"storage_bytes": total, "logits_bytes": logits}

    def check(self, expected: dict[str, Any]) -> None:
        diffs = _differences(self.signature, expected)
        if diffs:
            raise StoredLabelsMismatch(
                "stored labels do not match this post-evaluation (rerun the labels stage with its settings):\n  "
                + "\n  ".join(diffs))

    def state(self) -> dict[str, Any]:
        return {"signature": self.signature, "blocks": self.blocks, "num_classes": self.num_classes,
                "meta": self.meta}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "StoredLabels":
        return cls(**state)


def _compress(logits: torch.Tensor, topk: int | None, dtype: torch.dtype, temperature: float) -> dict:
    if topk is None or topk >= logits.shape[1]:
        return {"logits": logits.to(dtype).cpu()}
    values, indices = logits.topk(topk, dim=1)
    others = logits.scatter(1, indices, float("-inf"))
    # One logit for every other class such that, at the loss temperature, the
    # top-k probabilities are unchanged and the rest of the mass is spread
    # evenly (RDED's keep_top_k on softmax outputs, FKD's marginal smoothing).
    rest = temperature * (torch.logsumexp(others / temperature, dim=1) - math.log(logits.shape[1] - topk))
    index_dtype = torch.int16 if logits.shape[1] <= 32767 else torch.int32
    return {"values": values.to(dtype).cpu(), "indices": indices.to(index_dtype).cpu(), "rest": rest.to(dtype).cpu()}


def _expand(block: dict, num_classes: int, device: str) -> torch.Tensor:
    if "logits" in block:
        return block["logits"].to(device).float()
    values = block["values"].to(device).float()
    full = block["rest"].to(device).float().unsqueeze(1).repeat(1, num_classes)
    return full.scatter_(1, block["indices"].to(device).long(), values)


@torch.inference_mode()
def precompute(images: torch.Tensor, labels: torch.Tensor, info: DatasetInfo, protocol: Protocol,
               teachers: Mapping[str, nn.Module], *, batch_size: int, seed: int,
               runtime: Runtime = Runtime(), progress: ProgressFn | None = None) -> StoredLabels:
    """Run the labels stage: the same views the loop would draw, labelled by the
    (combined) teachers, kept compactly. ``progress`` hears of every batch."""
    t0 = time.perf_counter()
    spec = protocol.labels
    ensemble = TeacherEnsemble([runtime.place(t) for t in teachers.values()], spec.combine)
    data = images.to(runtime.device)
    hw = tuple(images.shape[-2:])
    n = int(labels.shape[0])
    blocks = []
    num_classes = None
    count = math.ceil(protocol.epochs / spec.refresh_every)
    steps = num_steps(n, batch_size)
    if progress is not None:
        progress(0, count * steps, "batch")
    for block in range(count):
        views = draw_views(protocol.augment, n, batch_size, hw, hw, seed, block)
        outs = []
        for step, idx in enumerate(views.order.to(runtime.device).split(batch_size)):
            x = make_batch(data[idx], views.params[step], protocol.augment, info, runtime)
            with torch.autocast("cuda", torch.bfloat16, enabled=runtime.amp):
                outs.append(ensemble(x).float())
            if progress is not None:
                progress(block * steps + step + 1, count * steps, "batch")
        logits = torch.cat(outs)
        num_classes = logits.shape[1]
        blocks.append({"order": views.order.to(torch.int32), "params": [p.state() for p in views.params],
                       **_compress(logits, spec.topk, DTYPES[spec.precision], protocol.loss.temperature)})
    out = StoredLabels(signature(protocol, images, labels, info, teachers, batch_size=batch_size, seed=seed),
                       blocks, int(num_classes))
    out.meta = {**out.nbytes(), "wall_s": time.perf_counter() - t0}
    return out


class StoredLabeler:
    """Replays stored labels: dictates each block's order and views to the loop
    and returns the stored logits of each step (expanded to full vectors)."""

    needs_teacher = False

    def __init__(self, stored: StoredLabels, runtime: Runtime = Runtime()):
        self.stored, self.device = stored, runtime.device
        self._block = -1
        self._views: Views | None = None
        self._logits: torch.Tensor | None = None
        self._starts: list[int] = []

    def _load(self, block: int) -> None:
        if block != self._block:
            if block >= len(self.stored.blocks):
                raise StoredLabelsMismatch(f"stored labels hold {len(self.stored.blocks)} blocks of epochs, "
                                           f"the loop asked for block {block + 1}")
            data = self.stored.blocks[block]
            params = [AugParams.from_state(p) for p in data["params"]]
            self._views = Views(data["order"].long(), params)
            self._logits = _expand(data, self.stored.num_classes, self.device)
            sizes = [p.n for p in params]
            self._starts = [sum(sizes[:i]) for i in range(len(sizes))]
            self._block = block

    def views(self, block: int) -> Views:
        self._load(block)
        return self._views

    def __call__(self, x: torch.Tensor, idx: torch.Tensor, params: AugParams, block: int, step: int) -> torch.Tensor:
        self._load(block)
        start = self._starts[step]
        return self._logits[start:start + x.shape[0]]
