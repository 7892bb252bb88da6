"""A teacher in RDED's checkpoint layout on real CIFAR-10: a network built as
RDED's code builds its ConvNet (our own re-statement), trained here on a
subset with ImageNet normalisation as RDED trains, saved as {"model":
state_dict}, then used as a study teacher (layout: rded, input_norm:
imagenet). The test top-1 the run records equals what evaluating that network
directly on the same JPEGs, normalised the way RDED's evaluation does, gives."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import cifar_subset
from elsewhere import RDEDConvNet, fit_plainly
from orchestrator.cli import main

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TRAIN, TEST = 300, 100  # images per class taken from the tarball
WIDTH = 32  # RDED's conv3 has width 128; the layout is the same at any width


@pytest.fixture
def subset(cifar_tarball, tmp_path) -> Path:
    return cifar_subset(cifar_tarball, tmp_path / "cifar_subset", TRAIN, TEST)


def as_rded_sees_it(files: list[Path]) -> torch.Tensor:
    """ToTensor then Normalize(ImageNet mean/std), as RDED's transforms do."""
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255.0)
                     .permute(2, 0, 1) for f in files])
    return (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def split_of(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    classes = sorted(p.name for p in (root / split).iterdir())
    files = [(f, i) for i, c in enumerate(classes) for f in sorted((root / split / c).iterdir())]
    return as_rded_sees_it([f for f, _ in files]), torch.tensor([i for _, i in files])


def test_rded_layout_teacher_records_the_top1_rded_would_measure(subset, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RD3_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    net = RDEDConvNet(num_classes=10, depth=3, width=WIDTH, size=32)
    x, y = split_of(subset, "train")
    fit_plainly(net, x, y, torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
                epochs=3, batch=64)
    tx, ty = split_of(subset, "test")
    with torch.no_grad():
        direct = (net(tx).argmax(1) == ty).float().mean().item()
    assert direct > 0.3, direct  # well above chance, so the run accepts it
    ckpt = tmp_path / "cifar10_conv3.pth"
    torch.save({"model": net.state_dict()}, ckpt)

    study = tmp_path / "rded_teacher.yaml"
    study.write_text(f"""\
name: rded_teacher
dataset: {{name: cifar10, root: {subset}}}
teachers:
  - arch: convnet3-w{WIDTH}-bn
    checkpoint: {ckpt}
    layout: rded
    input_norm: imagenet
methods:
  - {{name: random_real, ipc: 1}}
protocol:
  preset: rd3
  overrides: {{student: convnet1-w8, epochs: 1}}
""")
    out = tmp_path / "out"
    assert main(["run", str(study), "--out", str(out), "--executor", "local"]) == 0, capsys.readouterr().err
    [teacher] = (out / "artifacts" / "teacher").iterdir()
    recorded = json.loads((teacher / "manifest.json").read_text())["meta"]["metrics"]["top1"]
    assert abs(recorded - direct) <= 0.003  # within 0.3 points (expected: the same images, the same predictions)
    assert recorded == pytest.approx(direct, abs=1 / len(ty))  # at most one image of the test subset differs
