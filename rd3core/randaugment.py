"""RandAugment (Cubuk et al. 2020) applied to a whole batch at once.

Op ids and signs are drawn in :func:`rd3core.augment.draw`; this module only
applies them. The op list and magnitude scales (31 bins) are torchvision's.
Equalize, its 14th op, is drawn only with ``AugmentSpec.randaugment_equalize``:
the default draws from the 13 others, as every stored label and result so far
was drawn. How each op compares with torchvision's on the same parameters
(interpolation, shear centre, sub-pixel translation, borders) is in
docs/PROTOCOL.md and tests/test_augment_fidelity.py.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Equalize comes last so that the other ops' ids (stored as AugParams.ra_ops) mean
# the same with it and without it.
OPS = ("identity", "brightness", "color", "contrast", "sharpness", "posterize", "solarize",
       "autocontrast", "rotate", "shear_x", "shear_y", "translate_x", "translate_y", "equalize")


def num_ops(equalize: bool) -> int:
    """How many of OPS a draw picks from: ids 0..num_ops-1."""
    return len(OPS) if equalize else len(OPS) - 1


def _blend(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (b + factor.view(-1, 1, 1, 1) * (a - b)).clamp(0, 1)


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).expand_as(x)


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _equalize(x: torch.Tensor) -> torch.Tensor:
    """PIL's histogram equalisation (as torchvision's ``equalize``) of every image
    and channel at once: one 256-bin histogram per row of a [N*C, H*W] view."""
    n, c, h, w = x.shape
    # torchvision's float -> uint8 conversion (x * 255.999, truncated), so a float
    # image equalises exactly as torchvision's; the clamp only guards the cast.
    levels = (x.clamp(0, 1) * (256 - 1e-3)).to(torch.uint8).view(n * c, h * w).long()
    hist = torch.zeros(n * c, 256, dtype=torch.long, device=x.device).scatter_add_(1, levels, torch.ones_like(levels))
    # PIL: step = (pixels below the brightest level present) // 255; lut[k] =
    # (pixels below level k + step // 2) // step; step 0 leaves the image as it is.
    brightest = hist.gather(1, levels.amax(1, keepdim=True))
    step = (h * w - brightest) // 255
    below = hist.cumsum(1)[:, :-1]
    lut = torch.cat([torch.zeros_like(step), ((below + step // 2) // step.clamp(min=1)).clamp(max=255)], 1)
    out = torch.where(step > 0, lut.gather(1, levels), levels)
    return (out.to(x.dtype) * (1 / 255)).view_as(x)


def _op(name: str, x: torch.Tensor, signed: torch.Tensor, mag: float) -> torch.Tensor:
    """``signed`` holds +-1 per sample; ``mag`` is magnitude / 30 in [0, 1]."""
    n = x.shape[0]
    if name == "identity":
        return x
    if name in ("brightness", "color", "contrast", "sharpness"):
        factor = 1.0 + 0.9 * mag * signed
        if name == "brightness":
            return _blend(x, torch.zeros_like(x), factor)
        if name == "color":
            return _blend(x, _gray(x), factor)
        if name == "contrast":
            mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
            return _blend(x, mean.expand_as(x), factor)
        kernel = torch.tensor([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=x.dtype, device=x.device) / 13
        c = x.shape[1]
        blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel.expand(c, 1, 3, 3), groups=c)
        return _blend(x, blurred, factor)
    if name == "posterize":
        bits = 8 - round(4 * mag)  # torchvision: 8 - round(4 * bin / 30)
        levels = 2 ** bits
        return torch.floor(x * 255 / (256 // levels)) * (256 // levels) / 255
    if name == "solarize":
        threshold = 1.0 - mag
        return torch.where(x >= threshold, 1.0 - x, x)
    if name == "equalize":
        return _equalize(x)
    if name == "autocontrast":
        lo = x.amin(dim=(2, 3), keepdim=True)
        hi = x.amax(dim=(2, 3), keepdim=True)
        scale = torch.where(hi > lo, 1.0 / (hi - lo).clamp_min(1e-6), torch.ones_like(hi))
        return torch.where(hi > lo, (x - lo) * scale, x).clamp(0, 1)
    theta = torch.zeros(n, 2, 3, device=x.device)
    theta[:, 0, 0] = 1
    theta[:, 1, 1] = 1
    # theta acts on coordinates normalised to [-1, 1] per axis: a map A in pixels
    # is [[A00, A01 h/w], [A10 w/h, A11]] there (on a square image, A itself), or
    # a rotation of a non-square image would stretch it.
    h_per_w = x.shape[-2] / x.shape[-1]
    if name == "rotate":
        angle = math.radians(30.0 * mag) * signed
        theta[:, 0, 0], theta[:, 0, 1] = torch.cos(angle), -torch.sin(angle) * h_per_w
        theta[:, 1, 0], theta[:, 1, 1] = torch.sin(angle) / h_per_w, torch.cos(angle)
    elif name == "shear_x":
        theta[:, 0, 1] = 0.3 * mag * signed * h_per_w
    elif name == "shear_y":
        theta[:, 1, 0] = 0.3 * mag * signed / h_per_w
    elif name == "translate_x":
        theta[:, 0, 2] = 2 * (150 / 331) * mag * signed  # torchvision: 150/331 of the width at full magnitude
    elif name == "translate_y":
        theta[:, 1, 2] = 2 * (150 / 331) * mag * signed
    return _affine(x, theta)


def apply_randaugment(x: torch.Tensor, ops: torch.Tensor, signs: torch.Tensor, magnitude: int) -> torch.Tensor:
    # ops stay on the CPU: grouping samples by op there needs no device sync.
    ops, signs = ops.cpu().long(), signs.to(x.device, x.dtype)
    mag = magnitude / 30.0
    for j in range(ops.shape[1]):
        out = x.clone()
        for op_id in torch.unique(ops[:, j]).tolist():
            rows = torch.nonzero(ops[:, j] == op_id).flatten().to(x.device)
            out.index_copy_(0, rows, _op(OPS[op_id], x.index_select(0, rows), signs.index_select(0, rows)[:, j], mag))
        x = out
    return x
