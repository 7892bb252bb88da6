"""Teachers as other codebases make them, for the tests/test_teacher_*.py files:
our own re-statements of RDED's, DC/MTT's and SRe2L's networks (their key
layouts, not their code), and the plain training loop such code runs."""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import nn


def fit_plainly(model: nn.Module, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer, epochs: int,
                batch: int) -> nn.Module:
    """Cross-entropy on shuffled batches of already-normalised ``x``; eval mode after."""
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y)).split(batch):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


class RDEDConvNet(nn.Module):
    """RDED's ConvNet as its code builds it for conv<D>: per block conv3x3 -
    BatchNorm - ReLU - 2x2 average pool, held in a ModuleDict of lists
    (layers.conv / norm / act / pool), then a linear classifier."""

    def __init__(self, num_classes=10, depth=3, width=16, size=32, channels=3):
        super().__init__()
        convs, norms = [], []
        for d in range(depth):
            convs.append(nn.Conv2d(channels if d == 0 else width, width, 3, padding=1))
            norms.append(nn.BatchNorm2d(width))
        self.layers = nn.ModuleDict({"conv": nn.ModuleList(convs), "norm": nn.ModuleList(norms),
                                     "act": nn.ModuleList([nn.ReLU() for _ in range(depth)]),
                                     "pool": nn.ModuleList([nn.AvgPool2d(2, 2) for _ in range(depth)])})
        self.depth = depth
        self.classifier = nn.Linear(width * (size >> depth) ** 2, num_classes)

    def forward(self, x):
        for d in range(self.depth):
            x = self.layers["pool"][d](self.layers["act"][d](self.layers["norm"][d](self.layers["conv"][d](x))))
        return self.classifier(x.flatten(1))


def dc_convnet(norm: str, num_classes=10, depth=3, width=16, size=32, channels=3) -> nn.Module:
    """The DC/DSA/DM/MTT (and DD-Ranking) ConvNet: one Sequential `features` of
    [conv, norm, act, pool] per block ([conv, act, pool] without a norm);
    instancenorm is GroupNorm with a group per channel."""
    layers = []
    for d in range(depth):
        layers.append(nn.Conv2d(channels if d == 0 else width, width, 3, padding=1))
        if norm == "instancenorm":
            layers.append(nn.GroupNorm(width, width, affine=True))
        elif norm == "batchnorm":
            layers.append(nn.BatchNorm2d(width))
        layers += [nn.ReLU(inplace=True), nn.AvgPool2d(2, 2)]
    net = nn.Module()
    net.features = nn.Sequential(*layers)
    net.classifier = nn.Linear(width * (size >> depth) ** 2, num_classes)
    net.forward = lambda x: net.classifier(net.features(x).flatten(1))
    return net


def sre2l_cifar_resnet18(num_classes=10) -> nn.Module:
    """SRe2L's (and RDED's resnet18_modified) CIFAR teacher: torchvision's
    ResNet-18 with a 3x3 stride-1 stem and no max-pool."""
    model = torchvision.models.resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Running statistics away from their 0/1 start, so a lost one shows."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return model.eval()
