"""SRe2L "recover" (Yin et al., NeurIPS 2023; VILA-Lab/SRe2L): optimise images
so that a frozen BatchNorm teacher classifies them as their class *and* sees the
batch statistics it was trained on.

Per iteration: random resized crop + flip (ImageNet-size inputs; SRe2L's CIFAR
code uses neither), a random roll ("jitter") of up to ``jitter`` pixels, then
loss = CE(teacher(x_aug), y) + r_bn * sum_l a_l r_l where a forward hook on each
BN layer l measures r_l = ||var_run - var_batch||_2 + ||mean_run - mean_batch||_2
(batch variance biased, over N, H, W) and a = ``first_bn_weight`` for the first
BN layer, 1 elsewhere. Adam(lr, betas (0.5, 0.9)) with cosine decay to 0; after
each step the images are clamped to the valid pixel range; the last iterate is
kept. Images live in normalised space while optimised (N(0, 1) there is SRe2L's
noise init) and are stored as [0, 1] floats.

``recover`` is shared with CDA, which only changes the crop's minimum scale over
the iterations.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .. import augment as aug
from ..checkpoint import Checkpoint
from ..config import bounded
from ..data import Dataset, DatasetInfo, as_float
from ..loop import ProgressFn
from ..seeding import generator
from .base import DistilledSet, register_method, store_images
from .random_real import class_balanced_indices
from .teacher import arch_has_batchnorm, batchnorm_layers, frozen


@dataclass(frozen=True)
class SRe2LParams:
    ipc: int = bounded(10, ge=1, le=100_000)
    iterations: int = bounded(1000, ge=0, le=1_000_000)
    lr: float = bounded(0.25, gt=0, le=100)
    r_bn: float = bounded(0.01, ge=0, le=1e6)  # weight of the BN-matching term (SRe2L: 0.01 ImageNet/CIFAR, 1 Tiny)
    first_bn_weight: float = bounded(10.0, ge=0, le=1e6)
    # Max roll in px; None: 32 at >= 128 px inputs, 4 at 32-64 px, size // 8 below.
    jitter: int | None = bounded(None, ge=0, le=1024)
    crop: Literal["auto", "rrc", "none"] = "auto"  # auto: rrc at >= 64 px inputs, none below (SRe2L CIFAR)
    crop_scale: tuple[float, float] = (0.08, 1.0)
    flip: bool | None = None  # None: flip exactly when cropping
    init: Literal["noise", "real"] = "noise"  # RD3: real-image init helps
    batch_size: int = bounded(100, ge=1, le=65_536)  # images optimised together (BN statistics are over this batch)
    precision: Literal["uint8", "float32"] = "uint8"  # stored pixels (the methods publish 8-bit images)

    def validate(self):
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            yield "crop_scale", f"expected 0 < min <= max <= 1, got {list(self.crop_scale)}"


@dataclass(frozen=True)
class Resolved:
    crop: bool
    flip: bool
    jitter: int


def resolve(params: SRe2LParams, info: DatasetInfo) -> Resolved:
    crop = params.crop == "rrc" or (params.crop == "auto" and info.size >= 64)
    flip = crop if params.flip is None else params.flip
    if params.jitter is not None:
        jitter = params.jitter
    else:
        jitter = 32 if info.size >= 128 else 4 if info.size >= 32 else info.size // 8
    return Resolved(crop, flip, jitter)


def needs_bn_message(what: str) -> str:
    return (f"needs a teacher with BatchNorm layers (it matches their running statistics); {what} has none: "
            "use one such as convnet3-w32-bn or resnet18")


def check_bn_teacher(params, info: DatasetInfo, teacher_arch: str | None):
    if teacher_arch is not None and arch_has_batchnorm(teacher_arch, info) is False:
        yield "name", needs_bn_message(f"teacher {teacher_arch!r}")


class BNMatching:
    """Forward hooks on every BN layer recording r_l for the current batch."""

    def __init__(self, teacher: nn.Module, first_bn_weight: float):
        # Layers without running statistics have nothing to match.
        self.layers = [m for m in batchnorm_layers(teacher) if m.running_mean is not None]
        if not self.layers:
            raise ValueError(needs_bn_message(f"teacher {type(teacher).__name__}"))
        self.weights = [first_bn_weight] + [1.0] * (len(self.layers) - 1)
        self.r: list[torch.Tensor | None] = [None] * len(self.layers)
        self.handles = []

    def __enter__(self) -> "BNMatching":
        for i, layer in enumerate(self.layers):
            self.handles.append(layer.register_forward_hook(self._hook(i)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _hook(self, i: int):
        def hook(module, inputs, output):
            x = inputs[0].float()
            dims = [0, *range(2, x.ndim)]
            mean = x.mean(dims)
            var = x.var(dims, unbiased=False)
            self.r[i] = (torch.linalg.vector_norm(module.running_var - var, 2)
                         + torch.linalg.vector_norm(module.running_mean - mean, 2))
        return hook

    def loss(self) -> torch.Tensor:
        return sum(w * r for w, r in zip(self.weights, self.r))


@torch.no_grad()
def bn_matching_loss(teacher: nn.Module, x: torch.Tensor, first_bn_weight: float = 10.0) -> float:
    """The BN-matching term sum_l a_l r_l of normalised images ``x`` taken as one batch."""
    with frozen(teacher), BNMatching(teacher, first_bn_weight) as bn:
        teacher(x)
        return float(bn.loss())


def initial_images(dataset: Dataset, params: SRe2LParams, seed: int):
    """Normalised start images, ordered IPC-major (each batch holds whole rounds of
    classes, as SRe2L's one-image-per-class batches), their labels and, for a real
    init, the training indices they came from."""
    info = dataset.info
    c = info.num_classes
    labels = torch.arange(c).repeat(params.ipc)
    if params.init == "noise":
        x = torch.randn(len(labels), info.channels, info.size, info.size, generator=generator(seed, "sre2l", "init"))
        return x, labels, None
    idx = class_balanced_indices(dataset.train.labels, c, params.ipc, generator(seed, "sre2l", "init"))
    idx = idx.view(c, params.ipc).t().reshape(-1)  # class-major -> IPC-major
    return info.normalize(as_float(dataset.train.images[idx])), labels, idx


MinScale = Callable[[float], float]  # fraction of iterations done -> crop minimum scale


def recover(dataset: Dataset, teacher: nn.Module, params: SRe2LParams, seed: int, runtime,
            min_scale_at: MinScale | None = None, checkpoint: Checkpoint | None = None,
            progress: ProgressFn | None = None) -> tuple[DistilledSet, dict]:
    """Run the recover loop; returns the distilled set and a trace of the first
    batch (the crop minimum scale and mean crop area of every iteration).
    With ``checkpoint`` (rd3core.checkpoint) the batch being optimised, its
    optimiser and generator and the batches done are saved after an iteration
    whenever due, and resumed from at the start. ``progress`` hears of every
    iteration of every batch, with its loss."""
    info = dataset.info
    device = runtime.device
    setting = resolve(params, info)
    x0, labels, source = initial_images(dataset, params, seed)
    mean = torch.tensor(info.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(info.std, device=device).view(1, -1, 1, 1)
    lo, hi = (0 - mean) / std, (1 - mean) / std
    out = torch.empty_like(x0)
    trace: dict[str, list[float]] = {"min_scale": [], "crop_area": []}
    steps = params.iterations
    saved = checkpoint.load() if checkpoint is not None else None
    if saved is not None:
        out[:saved["done"]] = saved["out"]
        trace = saved["trace"]
    total = math.ceil(len(labels) / params.batch_size) * steps
    if progress is not None:  # from where a resumed run starts, so its ETA is timed from here
        progress(saved["batch"] * steps + saved["iteration"] if saved is not None else 0, total, "iteration")
    with frozen(teacher), BNMatching(teacher, params.first_bn_weight) as bn:
        bn_init = _mean_bn_loss(teacher, bn, x0, params.batch_size, device)
        for b, start in enumerate(range(0, len(labels), params.batch_size)):
            if saved is not None and b < saved["batch"]:
                continue  # done before the checkpoint: its images are in `out`
            gen = generator(seed, "sre2l", "batch", b)
            x = x0[start:start + params.batch_size].to(device).clone().requires_grad_(True)
            y = labels[start:start + params.batch_size].to(device)
            opt = torch.optim.Adam([x], lr=params.lr, betas=(0.5, 0.9), eps=1e-8)
            first = 0
            if saved is not None:  # the batch the checkpoint was taken in
                with torch.no_grad():
                    x.copy_(saved["x"])
                opt.load_state_dict(saved["opt"])
                gen.set_state(saved["gen"])
                first, saved = saved["iteration"], None
            for it in range(first, steps):
                opt.param_groups[0]["lr"] = 0.5 * (1 + math.cos(math.pi * it / steps)) * params.lr
                view = x
                if setting.crop or setting.flip:
                    low = min_scale_at(it / steps) if min_scale_at is not None else params.crop_scale[0]
                    spec = aug.AugmentSpec(crop="rrc" if setting.crop else "none", flip=setting.flip, mix="none",
                                           scale=(min(low, params.crop_scale[1]), params.crop_scale[1]))
                    drawn = aug.draw(spec, x.shape[0], info.size, info.size, gen)
                    view = aug.apply(x, drawn, spec)
                    if b == 0:
                        trace["min_scale"].append(spec.scale[0] if setting.crop else 1.0)
                        area = 1.0 if drawn.crop is None else float(
                            (drawn.crop[:, 2].float() * drawn.crop[:, 3].float()).mean() / (info.size * info.size))
                        trace["crop_area"].append(area)
                if setting.jitter:
                    dx, dy = (int(v) for v in torch.randint(0, setting.jitter + 1, (2,), generator=gen))
                    view = torch.roll(view, shifts=(dx, dy), dims=(2, 3))
                loss = F.cross_entropy(teacher(view), y) + params.r_bn * bn.loss()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    x.copy_(torch.maximum(torch.minimum(x, hi), lo))
                if progress is not None:  # the loss as a tensor: no host sync unless it is reported
                    progress(b * steps + it + 1, total, "iteration", loss=loss.detach())
                if checkpoint is not None and checkpoint.due():
                    checkpoint.save({"batch": b, "iteration": it + 1, "x": x.detach().cpu(), "opt": opt.state_dict(),
                                     "gen": gen.get_state(), "done": start, "out": out[:start].clone(),
                                     "trace": trace}, f"batch {b + 1} iteration {it + 1}")
            out[start:start + params.batch_size] = x.detach().cpu()
        images = store_images(info.denormalize(out), params.precision)
        bn_final = _mean_bn_loss(teacher, bn, info.normalize(as_float(images)), params.batch_size, device)
    order = torch.sort(labels, stable=True).indices  # stored class-major, like every method
    distilled = DistilledSet(images[order].contiguous(), labels[order].clone(),
                             source_indices=source[order].clone() if source is not None else None,
                             meta={"bn_loss_init": bn_init, "bn_loss_final": bn_final,
                                   "crop": setting.crop, "flip": setting.flip, "jitter": setting.jitter})
    return distilled, trace


@torch.no_grad()
def _mean_bn_loss(teacher: nn.Module, bn: BNMatching, x: torch.Tensor, batch_size: int, device) -> float:
    """BN-matching term of clean images, batch by batch as optimised, averaged."""
    values = []
    for start in range(0, len(x), batch_size):
        teacher(x[start:start + batch_size].to(device))
        values.append(float(bn.loss()))
    return sum(values) / len(values)


@register_method("sre2l", SRe2LParams, needs_teacher=True, check=check_bn_teacher, long_loop=True)
def sre2l(dataset, teacher, params: SRe2LParams, seed: int, runtime, checkpoint: Checkpoint | None = None,
          progress: ProgressFn | None = None) -> DistilledSet:
    return recover(dataset, teacher, params, seed, runtime, checkpoint=checkpoint, progress=progress)[0]
