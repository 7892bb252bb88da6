"""Model registry: the field's ConvNet-D, ResNets with a small-image stem, and any
timm (``timm/<name>``) or torchvision (``tv/<name>``) architecture.

Every factory has the same signature ``(num_classes, channels, size) -> nn.Module``,
so the kernel never needs to know which family it builds.
"""
from __future__ import annotations

import re
from typing import Callable

import torch
from torch import nn

from .registry import Registry

Factory = Callable[[int, int, int], nn.Module]
MODELS: Registry[Factory] = Registry("model")


def _norm(kind: str, width: int) -> nn.Module:
    if kind == "in":
        # The field's "instancenorm" is GroupNorm with one channel per group and
        # affine parameters (DC/DM/MTT ConvNet code).
        return nn.GroupNorm(width, width, affine=True)
    if kind == "bn":
        return nn.BatchNorm2d(width)
    return nn.Identity()


class ConvNet(nn.Module):
    """ConvNet-D: D x [conv3x3(width) - norm - ReLU - avgpool2], then a linear head."""

    def __init__(self, num_classes: int, channels: int, size: int, depth: int = 3, width: int = 128, norm: str = "in"):
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = channels
        for _ in range(depth):
            layers += [nn.Conv2d(in_ch, width, 3, padding=1), _norm(norm, width), nn.ReLU(inplace=True), nn.AvgPool2d(2)]
            in_ch = width
            size //= 2
        if size < 1:
            raise ValueError(f"ConvNet depth {depth} pools the input below one pixel")
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * size * size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


_CONVNET = re.compile(r"^convnet(?P<depth>[1-6])(?:-w(?P<width>\d+))?(?:-(?P<norm>in|bn|nn))?$")


def _resolve_convnet(name: str) -> Factory | None:
    m = _CONVNET.match(name)
    if not m:
        return None
    depth, width, norm = int(m["depth"]), int(m["width"] or 128), m["norm"] or "in"
    return lambda num_classes, channels, size: ConvNet(num_classes, channels, size, depth, width, norm)


MODELS.add_resolver(_resolve_convnet)
for _d in (3, 4, 5):
    # Listed spellings; any "convnet<D>[-w<W>][-in|-bn|-nn]" also resolves.
    MODELS.add(f"convnet{_d}", _resolve_convnet(f"convnet{_d}"))
    MODELS.add(f"convnet{_d}-bn", _resolve_convnet(f"convnet{_d}-bn"))


def _small_stem_resnet(arch: str) -> Factory:
    def build(num_classes: int, channels: int, size: int) -> nn.Module:
        import torchvision

        model = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
        if size <= 64:
            # 32-64 px inputs: 3x3 stride-1 stem and no max-pool (SRe2L/RDED CIFAR code).
            model.conv1 = nn.Conv2d(channels, 64, 3, 1, 1, bias=False)
            model.maxpool = nn.Identity()
        elif channels != 3:
            model.conv1 = nn.Conv2d(channels, 64, 7, 2, 3, bias=False)
        return model
    return build


for _arch in ("resnet18", "resnet50", "resnet101"):
    MODELS.add(_arch, _small_stem_resnet(_arch))


def timm_model(name: str, num_classes: int, channels: int, size: int, **kwargs) -> nn.Module:
    """timm model ``name`` (``<arch>`` or ``<arch>.<tag>``) for ``size`` px inputs:
    models that take an input size (ViTs, ...) are built for it, the others
    (CNNs) take any size. ``kwargs`` go to ``timm.create_model`` (pretrained)."""
    import timm

    args = dict(num_classes=num_classes, in_chans=channels, **kwargs)
    try:
        return timm.create_model(name, img_size=size, **args)
    except TypeError as exc:
        if "img_size" not in str(exc):
            raise
    return timm.create_model(name, **args)


def _timm_known(name: str) -> bool:
    import timm

    return timm.is_model(name)


def _torchvision_known(name: str) -> bool:
    import torchvision

    return name in torchvision.models.list_models()


def _resolve_external(name: str) -> Factory | None:
    # Only names the library knows resolve: a typo is a validation error, not a
    # failure hours later in a worker.
    if name.startswith("timm/") and _timm_known(name[5:]):
        def build(num_classes: int, channels: int, size: int) -> nn.Module:
            return timm_model(name[5:], num_classes, channels, size, pretrained=False)
        return build
    if name.startswith("tv/") and _torchvision_known(name[3:]):
        def build(num_classes: int, channels: int, size: int) -> nn.Module:
            import torchvision
            if channels != 3:
                raise ValueError(f"model {name!r} expects 3 input channels, the dataset has {channels}")
            return torchvision.models.get_model(name[3:], weights=None, num_classes=num_classes)
        return build
    return None


def _external_hint(name: str) -> str | None:
    import difflib

    if name.startswith("timm/"):
        import timm
        library, names = f"timm {timm.__version__}", timm.list_models()
    elif name.startswith("tv/"):
        import torchvision
        library, names = f"torchvision {torchvision.__version__}", torchvision.models.list_models()
    else:
        return None
    prefix, _, short = name.partition("/")
    close = difflib.get_close_matches(short, names, n=3)
    hint = f"; did you mean {', '.join(prefix + '/' + c for c in close)}?" if close else ""
    return f"{library} has no model {short!r}{hint}"


MODELS.add_resolver(_resolve_external, _external_hint)


def create_model(name: str, num_classes: int, channels: int, size: int) -> nn.Module:
    return MODELS.get(name)(num_classes, channels, size)


def list_models() -> list[str]:
    return MODELS.names()
