"""What synthesis methods ask of a frozen teacher: batched inference without
gradients, per-image cross-entropy, penultimate features, BatchNorm layers."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..data import DatasetInfo
from ..models import MODELS, create_model

CHUNK = 256  # images per teacher forward; memory only, results do not depend on it


@contextmanager
def frozen(teacher: nn.Module) -> Iterator[nn.Module]:
    """Eval mode (BatchNorm uses its running statistics) and no parameter
    gradients while a method uses the teacher; restored afterwards, since
    workers keep teachers between jobs."""
    was_training = teacher.training
    flags = [p.requires_grad for p in teacher.parameters()]
    teacher.eval().requires_grad_(False)
    try:
        yield teacher
    finally:
        teacher.train(was_training)
        for p, flag in zip(teacher.parameters(), flags):
            p.requires_grad_(flag)


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def logits(teacher: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Teacher logits of normalised images ``x``, in chunks."""
    device = _device(teacher)
    with frozen(teacher):
        return torch.cat([teacher(x[i:i + CHUNK].to(device)).float() for i in range(0, len(x), CHUNK)])


def cross_entropy(teacher: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image CE of the teacher on the true class (lower: more typical of the class)."""
    out = logits(teacher, x)
    return F.cross_entropy(out, y.to(out.device), reduction="none")


def classifier_layer(model: nn.Module) -> nn.Linear:
    """The last linear layer: its input is the penultimate feature vector in
    every registered architecture (ConvNet, ResNet, timm/torchvision heads)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no linear classifier layer to take features from")
    return linears[-1]


@torch.no_grad()
def penultimate_features(teacher: nn.Module, x: torch.Tensor) -> torch.Tensor:
    captured: list[torch.Tensor] = []
    handle = classifier_layer(teacher).register_forward_hook(
        lambda module, inputs, output: captured.append(torch.flatten(inputs[0], 1).float()))
    try:
        logits(teacher, x)
    finally:
        handle.remove()
    return torch.cat(captured)


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def arch_has_batchnorm(arch: str, info: DatasetInfo) -> bool | None:
    """Whether architecture ``arch`` has BatchNorm layers, built without
    allocating weights (meta device); None when it cannot be built here."""
    if arch not in MODELS:
        return None
    try:
        with torch.device("meta"):
            model = create_model(arch, info.num_classes, info.channels, info.size)
    except Exception:
        return None
    return bool(batchnorm_layers(model))
