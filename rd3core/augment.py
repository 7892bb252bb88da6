"""Batched augmentation that returns the parameters it drew.

``draw`` samples every random choice for a batch from a seeded CPU generator;
``apply`` is a pure function of (images, params). Splitting the two is what lets
the teacher see exactly the student's views, and lets stored (FKD-style) labels
be replayed later from their recorded parameters. Order follows RDED's
pipeline: ShufflePatches -> RandomResizedCrop (or padded crop) + flip -> RandAugment
-> CutMix / MixUp on the batch.

Crop and flip are one ``affine_grid`` + ``grid_sample`` for the whole batch, so
the hot loop has no per-sample Python. The crop is taken from the input size
and resampled to the output size, so a streamed 256 px decode can be cropped to
a 224 px view on the device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from .config import added_field, bounded


@dataclass(frozen=True)
class AugmentSpec:
    crop: Literal["none", "rrc", "pad"] = "rrc"
    scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    padding: int = bounded(4, ge=0, le=1024)  # crop == "pad": RandomCrop(size, padding) as in CIFAR recipes
    flip: bool = True
    mix: Literal["none", "cutmix", "mixup"] = "cutmix"
    mix_alpha: float = bounded(1.0, gt=0, le=1000)  # CutMix's beta or MixUp's alpha: lam ~ Beta(a, a)
    mix_prob: float = bounded(1.0, ge=0, le=1)  # probability that a batch is mixed
    # RDED's ShufflePatches(f): the image is cut into f column strips that are
    # permuted, then into f row strips that are permuted; 1 = off.
    shuffle_patches: int = bounded(1, ge=1, le=64)
    randaugment: tuple[int, int] | None = None  # (num_ops, magnitude 0-30), or None
    # Draw Equalize too, as torchvision's RandAugment (14 ops) does; off, the 13 ops
    # that existing stored labels and results were drawn from (rd3core.randaugment).
    randaugment_equalize: bool = added_field(False)

    def validate(self):
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            yield "scale", f"expected 0 < min <= max <= 1, got {list(self.scale)}"
        if not 0 < self.ratio[0] <= self.ratio[1]:
            yield "ratio", f"expected 0 < min <= max, got {list(self.ratio)}"
        if self.randaugment is not None and (self.randaugment[0] < 0 or not 0 <= self.randaugment[1] <= 30):
            yield "randaugment", f"expected [num_ops >= 0, magnitude 0-30], got {list(self.randaugment)}"
        if self.randaugment_equalize and self.randaugment is None:
            yield "randaugment_equalize", "has no effect without randaugment"


NO_AUGMENT = AugmentSpec(crop="none", flip=False, mix="none")


@dataclass
class AugParams:
    """Everything one batch's augmentation drew, in compact dtypes (this is what
    stored labels keep per step). Tensors stay on the CPU; ``apply`` moves what
    it needs."""

    n: int
    in_hw: tuple[int, int]
    out_hw: tuple[int, int]
    crop: torch.Tensor | None = None  # [N, 4] int16 (top, left, height, width) in input pixels
    flip: torch.Tensor | None = None  # [N] bool
    patch_cols: torch.Tensor | None = None  # [N, f] int8: source strip of each column strip
    patch_rows: torch.Tensor | None = None  # [N, f] int8
    ra_ops: torch.Tensor | None = None  # [N, num_ops] int8 RandAugment op ids
    ra_signs: torch.Tensor | None = None  # [N, num_ops] int8 +-1
    mix_perm: torch.Tensor | None = None  # [N] int64: partner of each sample
    mix_lam: float = 1.0  # weight of the sample itself after mixing
    mix_box: tuple[int, int, int, int] | None = None  # CutMix (y0, y1, x0, x1) in output pixels

    def mixed(self) -> bool:
        return self.mix_perm is not None

    def state(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_state(cls, state: dict) -> "AugParams":
        state = dict(state)
        for key in ("in_hw", "out_hw", "mix_box"):
            if state.get(key) is not None:
                state[key] = tuple(int(v) for v in state[key])
        return cls(**state)

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.state().values() if isinstance(v, torch.Tensor))


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


def _perms(n: int, f: int, gen: torch.Generator) -> torch.Tensor:
    return torch.argsort(torch.rand(n, f, generator=gen), dim=1).to(torch.int8)


def draw(spec: AugmentSpec, n: int, h: int, w: int, gen: torch.Generator,
         out_hw: tuple[int, int] | None = None) -> AugParams:
    """Draw one batch's augmentation for ``n`` inputs of ``h`` x ``w`` pixels,
    producing views of ``out_hw`` (default: the input size)."""
    oh, ow = out_hw or (h, w)
    params = AugParams(n=n, in_hw=(h, w), out_hw=(oh, ow))
    f = spec.shuffle_patches
    if f > 1:
        params.patch_cols = _perms(n, f, gen)
        params.patch_rows = _perms(n, f, gen)
    if spec.crop == "rrc":
        params.crop = _rrc_boxes(n, h, w, spec, gen).to(torch.int16)
    elif spec.crop == "pad":
        p = spec.padding
        shift = torch.randint(-p, p + 1, (n, 2), generator=gen)
        params.crop = torch.cat([shift, torch.tensor([h, w]).expand(n, 2)], 1).to(torch.int16)
    if spec.flip:
        params.flip = torch.rand(n, generator=gen) < 0.5
    if spec.randaugment is not None and spec.randaugment[0] > 0:
        from .randaugment import num_ops
        k = spec.randaugment[0]
        params.ra_ops = torch.randint(0, num_ops(spec.randaugment_equalize), (n, k), generator=gen).to(torch.int8)
        params.ra_signs = (torch.randint(0, 2, (n, k), generator=gen) * 2 - 1).to(torch.int8)
    if spec.mix != "none" and n > 1 and torch.rand(1, generator=gen).item() < spec.mix_prob:
        # numpy's Beta, seeded from the torch generator: torch's Beta sampler takes no generator.
        rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=gen)))
        lam = float(rng.beta(spec.mix_alpha, spec.mix_alpha))
        params.mix_perm = torch.randperm(n, generator=gen)
        if spec.mix == "cutmix":
            cy = int(torch.randint(0, oh, (1,), generator=gen))
            cx = int(torch.randint(0, ow, (1,), generator=gen))
            params.mix_box, lam = cutmix_box(lam, cy, cx, oh, ow)
        params.mix_lam = lam
    return params


def cutmix_box(lam: float, cy: int, cx: int, oh: int, ow: int) -> tuple[tuple[int, int, int, int], float]:
    """SRe2L/RDED's rand_bbox: a box of side sqrt(1 - lam) centred on (cy, cx),
    clipped to the image. Returns (y0, y1, x0, x1) and the label weight, which is
    the area actually kept after clipping (what torchvision's CutMix calls lam_adjusted)."""
    cut = math.sqrt(1.0 - lam)
    half_h, half_w = int(oh * cut) // 2, int(ow * cut) // 2
    y0, y1 = max(cy - half_h, 0), min(cy + half_h, oh)
    x0, x1 = max(cx - half_w, 0), min(cx + half_w, ow)
    return (y0, y1, x0, x1), 1.0 - (y1 - y0) * (x1 - x0) / (oh * ow)


def _strip_index(perm: torch.Tensor, size: int, f: int) -> torch.Tensor:
    """[N, size] source position of every output position when f strips of
    size // f are permuted (a remainder that f does not divide stays in place)."""
    width = size // f
    pos = torch.arange(size, device=perm.device)
    strip = (pos // width).clamp(max=f - 1)
    src = perm.long()[:, strip] * width + pos % width
    return torch.where(pos < width * f, src, pos.expand_as(src))


def shuffle_patches(x: torch.Tensor, cols: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    f = cols.shape[1]
    col_idx = _strip_index(cols.to(x.device), w, f)
    x = x.gather(3, col_idx.view(n, 1, 1, w).expand(n, c, h, w))
    row_idx = _strip_index(rows.to(x.device), h, f)
    return x.gather(2, row_idx.view(n, 1, h, 1).expand(n, c, h, w))


def crop_theta(crop: torch.Tensor | None, flip: torch.Tensor | None, n: int, in_hw: tuple[int, int],
               device: torch.device | str) -> torch.Tensor:
    """The affine map from output to input coordinates (align_corners=False)
    that takes each crop box (whole image when None), mirrored where flipped."""
    h, w = in_hw
    if crop is None:
        top, left = torch.zeros(n, device=device), torch.zeros(n, device=device)
        ch, cw = torch.full((n,), float(h), device=device), torch.full((n,), float(w), device=device)
    else:
        top, left, ch, cw = crop.to(device).float().unbind(1)
    sx, sy = cw / w, ch / h
    if flip is not None:
        sx = torch.where(flip.to(device), -sx, sx)
    zeros = torch.zeros_like(sx)
    cx = (left + cw / 2) / w * 2 - 1
    cy = (top + ch / 2) / h * 2 - 1
    return torch.stack([torch.stack([sx, zeros, cx], 1), torch.stack([zeros, sy, cy], 1)], 1)


def apply(x: torch.Tensor, params: AugParams, spec: AugmentSpec) -> torch.Tensor:
    """Apply drawn parameters to a float batch in [0, 1] (pure; no randomness)."""
    if tuple(x.shape[-2:]) != params.in_hw:
        raise ValueError(f"augmentation drawn for {params.in_hw} inputs, applied to {tuple(x.shape[-2:])}")
    if params.patch_cols is not None:
        x = shuffle_patches(x, params.patch_cols, params.patch_rows)
    if params.crop is not None or params.flip is not None or params.out_hw != params.in_hw:
        theta = crop_theta(params.crop, params.flip, x.shape[0], params.in_hw, x.device).to(x.dtype)
        grid = F.affine_grid(theta, [x.shape[0], x.shape[1], *params.out_hw], align_corners=False)
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


def augment(x: torch.Tensor, spec: AugmentSpec, gen: torch.Generator,
            out_hw: tuple[int, int] | None = None) -> tuple[torch.Tensor, AugParams]:
    params = draw(spec, x.shape[0], x.shape[-2], x.shape[-1], gen, out_hw)
    return apply(x, params, spec), params


def without_mixing(spec: AugmentSpec) -> AugmentSpec:
    return replace(spec, mix="none")
