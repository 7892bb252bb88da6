"""Batched augmentation that returns the parameters it drew.

``draw`` samples every random choice for a batch from a seeded CPU generator;
``apply`` is a pure function of (images, params). Splitting the two is what lets
the teacher see exactly the student's views, and lets stored (FKD-style) labels
be replayed later from their recorded parameters. Order follows RDED's
pipeline: ShufflePatches -> RandomResizedCrop (or padded crop) + flip -> RandAugment
-> CutMix / MixUp on the batch.

Crop and flip are one ``affine_grid`` + ``grid_sample`` for the whole batch, so
the hot loop has no per-sample Python.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentSpec:
    crop: Literal["none", "rrc", "pad"] = "rrc"
    scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    padding: int = 4  # crop == "pad": RandomCrop(size, padding) as in CIFAR recipes
    flip: bool = True
    mix: Literal["none", "cutmix", "mixup"] = "cutmix"
    mix_alpha: float = 1.0  # CutMix's beta or MixUp's alpha: lam ~ Beta(a, a)
    mix_prob: float = 1.0  # probability that a batch is mixed
    shuffle_patches: int = 1  # RDED's factor f: f x f patches permuted per image; 1 = off
    randaugment: tuple[int, int] | None = None  # (num_ops, magnitude 0-30), or None

    def validate(self):
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            yield "scale", f"expected 0 < min <= max <= 1, got {list(self.scale)}"
        if not 0 < self.ratio[0] <= self.ratio[1]:
            yield "ratio", f"expected 0 < min <= max, got {list(self.ratio)}"
        if self.mix != "none" and self.mix_alpha <= 0:
            yield "mix_alpha", f"expected > 0, got {self.mix_alpha}"
        if not 0 <= self.mix_prob <= 1:
            yield "mix_prob", f"expected a probability, got {self.mix_prob}"
        if self.shuffle_patches < 1:
            yield "shuffle_patches", f"expected >= 1, got {self.shuffle_patches}"
        if self.padding < 0:
            yield "padding", f"expected >= 0, got {self.padding}"
        if self.randaugment is not None and (self.randaugment[0] < 0 or not 0 <= self.randaugment[1] <= 30):
            yield "randaugment", f"expected [num_ops >= 0, magnitude 0-30], got {list(self.randaugment)}"


NO_AUGMENT = AugmentSpec(crop="none", flip=False, mix="none")


@dataclass
class AugParams:
    """Everything one batch's augmentation drew. Tensors live on the CPU until
    ``apply`` moves what it needs; ``to_record`` gives compact storage."""

    n: int
    theta: torch.Tensor | None = None  # [N, 2, 3] crop + flip as an affine map
    patch_perm: torch.Tensor | None = None  # [N, f*f]
    ra_ops: torch.Tensor | None = None  # [N, num_ops] RandAugment op ids
    ra_signs: torch.Tensor | None = None  # [N, num_ops] +-1
    mix_perm: torch.Tensor | None = None  # [N] partner of each sample
    mix_lam: float = 1.0  # weight of the sample itself after mixing
    mix_box: tuple[int, int, int, int] | None = None  # CutMix (y0, y1, x0, x1)

    def mixed(self) -> bool:
        return self.mix_perm is not None

    def state(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_state(cls, state: dict) -> "AugParams":
        return cls(**state)


def _rrc_boxes(n: int, h: int, w: int, spec: AugmentSpec, gen: torch.Generator) -> torch.Tensor:
    """torchvision's RandomResizedCrop sampling (10 tries, then a centre crop with
    the ratio clamped), vectorised over the batch. Returns [N, 4] = (top, left, hh, ww)."""
    tries = 10
    area = h * w
    target = area * (spec.scale[0] + (spec.scale[1] - spec.scale[0]) * torch.rand(n, tries, generator=gen))
    log_lo, log_hi = math.log(spec.ratio[0]), math.log(spec.ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(n, tries, generator=gen))
    cw = torch.sqrt(target * aspect).round()
    ch = torch.sqrt(target / aspect).round()
    ok = (cw > 0) & (ch > 0) & (cw <= w) & (ch <= h)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1))
    # Fallback (no valid try): whole image with the ratio clamped, centred.
    in_ratio = w / h
    if in_ratio < spec.ratio[0]:
        fw, fh = w, round(w / spec.ratio[0])
    elif in_ratio > spec.ratio[1]:
        fw, fh = round(h * spec.ratio[1]), h
    else:
        fw, fh = w, h
    rows = torch.arange(n)
    pick = first.clamp(min=0)
    cw = torch.where(first >= 0, cw[rows, pick], torch.full((n,), float(fw)))
    ch = torch.where(first >= 0, ch[rows, pick], torch.full((n,), float(fh)))
    u = torch.rand(n, 2, generator=gen)
    top = torch.where(first >= 0, torch.floor(u[:, 0] * (h - ch + 1)), torch.full((n,), float((h - fh) // 2)))
    left = torch.where(first >= 0, torch.floor(u[:, 1] * (w - cw + 1)), torch.full((n,), float((w - fw) // 2)))
    return torch.stack([top, left, ch, cw], 1)


def draw(spec: AugmentSpec, n: int, h: int, w: int, gen: torch.Generator) -> AugParams:
    params = AugParams(n=n)
    f = spec.shuffle_patches
    if f > 1:
        params.patch_perm = torch.argsort(torch.rand(n, f * f, generator=gen), dim=1)
    if spec.crop != "none" or spec.flip:
        if spec.crop == "rrc":
            top, left, ch, cw = _rrc_boxes(n, h, w, spec, gen).unbind(1)
        elif spec.crop == "pad":
            p = spec.padding
            shift = torch.randint(-p, p + 1, (n, 2), generator=gen).float()
            top, left = shift[:, 0], shift[:, 1]
            ch, cw = torch.full((n,), float(h)), torch.full((n,), float(w))
        else:
            top, left = torch.zeros(n), torch.zeros(n)
            ch, cw = torch.full((n,), float(h)), torch.full((n,), float(w))
        flip = torch.rand(n, generator=gen) < 0.5 if spec.flip else torch.zeros(n, dtype=torch.bool)
        # Output pixel grid in [-1, 1] maps to the crop (align_corners=False convention).
        sx, sy = cw / w, ch / h
        cx = (left + cw / 2) / w * 2 - 1
        cy = (top + ch / 2) / h * 2 - 1
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0] = torch.where(flip, -sx, sx)
        theta[:, 0, 2] = cx
        theta[:, 1, 1] = sy
        theta[:, 1, 2] = cy
        params.theta = theta
    if spec.randaugment is not None and spec.randaugment[0] > 0:
        from .randaugment import NUM_OPS
        k = spec.randaugment[0]
        params.ra_ops = torch.randint(0, NUM_OPS, (n, k), generator=gen)
        params.ra_signs = torch.randint(0, 2, (n, k), generator=gen) * 2 - 1
    if spec.mix != "none" and n > 1 and torch.rand(1, generator=gen).item() < spec.mix_prob:
        # numpy's Beta, seeded from the torch generator: torch's Beta sampler takes no generator.
        lam = float(np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=gen))).beta(spec.mix_alpha, spec.mix_alpha))
        params.mix_perm = torch.randperm(n, generator=gen)
        if spec.mix == "cutmix":
            cut = math.sqrt(1.0 - lam)
            cut_h, cut_w = int(h * cut), int(w * cut)
            cy, cx = (int(v) for v in torch.randint(0, 1 << 30, (2,), generator=gen) % torch.tensor([h, w]))
            y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
            x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
            params.mix_box = (y0, y1, x0, x1)
            # The label weight is the area actually kept after clipping the box.
            lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
        params.mix_lam = lam
    return params


def shuffle_patches(x: torch.Tensor, perm: torch.Tensor, f: int) -> torch.Tensor:
    n, c, h, w = x.shape
    ph, pw = h // f, w // f
    core = x[:, :, : ph * f, : pw * f]
    patches = core.reshape(n, c, f, ph, f, pw).permute(0, 2, 4, 1, 3, 5).reshape(n, f * f, c, ph, pw)
    idx = perm.to(x.device).view(n, f * f, 1, 1, 1).expand_as(patches)
    patches = torch.gather(patches, 1, idx)
    out = patches.reshape(n, f, f, c, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(n, c, ph * f, pw * f)
    if out.shape != x.shape:  # sizes not divisible by f keep their border
        x = x.clone()
        x[:, :, : ph * f, : pw * f] = out
        return x
    return out


def apply(x: torch.Tensor, params: AugParams, spec: AugmentSpec) -> torch.Tensor:
    """Apply drawn parameters to a float batch in [0, 1] (pure; no randomness)."""
    if params.patch_perm is not None:
        x = shuffle_patches(x, params.patch_perm, spec.shuffle_patches)
    if params.theta is not None:
        grid = F.affine_grid(params.theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if params.ra_ops is not None:
        from .randaugment import apply_randaugment
        x = apply_randaugment(x, params.ra_ops, params.ra_signs, spec.randaugment[1])
    if params.mix_perm is not None:
        partner = x[params.mix_perm.to(x.device)]
        if params.mix_box is not None:
            y0, y1, x0, x1 = params.mix_box
            x = x.clone()
            x[:, :, y0:y1, x0:x1] = partner[:, :, y0:y1, x0:x1]
        else:
            x = params.mix_lam * x + (1.0 - params.mix_lam) * partner
    return x


def augment(x: torch.Tensor, spec: AugmentSpec, gen: torch.Generator) -> tuple[torch.Tensor, AugParams]:
    params = draw(spec, x.shape[0], x.shape[-2], x.shape[-1], gen)
    return apply(x, params, spec), params


def without_mixing(spec: AugmentSpec) -> AugmentSpec:
    return replace(spec, mix="none")
