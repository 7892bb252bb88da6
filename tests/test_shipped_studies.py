"""The studies shipped in studies/: each validates as it is, says what the issues
ask of it, and finds its data through --data or RD3_DATA_<NAME>."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from orchestrator.cli import main
from orchestrator.study.spec import load_study

STUDIES = sorted((ROOT / "studies").glob("*.yaml"))
NAMES = {p.stem for p in STUDIES}


@pytest.fixture
def data_dirs(tmp_path, monkeypatch):
    """Every non-bundled dataset pointed at an existing folder (validation checks
    that the path exists; nothing is loaded)."""
    for name in ("cifar10", "cifar100", "imagenet1k"):
        monkeypatch.setenv(f"RD3_DATA_{name.upper()}", str(tmp_path))


def test_the_issue_s_studies_are_shipped():
    assert {"protocol_ablation", "rd3_cifar10", "rd3_cifar100", "rd3_imagenet1k", "sweep_batch_zeta",
            "sweep_gamma", "sweep_teacher_arch"} <= NAMES


@pytest.mark.parametrize("path", STUDIES, ids=[p.stem for p in STUDIES])
def test_every_shipped_study_validates(path, data_dirs, capsys):
    assert main(["validate", str(path)]) == 0, capsys.readouterr().err
    assert "ok (" in capsys.readouterr().out
    text = path.read_text().lower()
    assert "expected run time" in text or "measured" in text  # each says how long it takes


def columns(study) -> dict[str, set]:
    from orchestrator.study.expand import expand
    cells = expand(study)
    out: dict[str, set] = {}
    for cell in cells:
        for k, v in cell.factors.items():
            out.setdefault(k, set()).add(v)
    return out


@pytest.mark.parametrize("name", ["rd3_cifar10", "rd3_cifar100"])
def test_rd3_cifar_studies_compare_native_with_unified_at_ipc_10_and_50(name, data_dirs):
    study = load_study(ROOT / "studies" / f"{name}.yaml")
    seen = columns(study)
    assert seen["method"] == {"random_real", "sre2l", "cda", "rded", "herding"}
    assert seen["method.ipc"] == {10, 50}
    assert seen["protocol"] == {"native", "rd3"} and study.spec.protocol.preset == "rd3"
    assert len(study.spec.seeds) >= 3


def test_the_reviewers_sweeps(data_dirs):
    gamma = columns(load_study(ROOT / "studies" / "sweep_gamma.yaml"))
    assert gamma["protocol.loss.gamma"] == {0.0, 0.01, 0.025, 0.05}
    grid = columns(load_study(ROOT / "studies" / "sweep_batch_zeta.yaml"))
    assert len(grid["protocol.batch_size"]) >= 3 and len(grid["protocol.schedule.zeta"]) >= 2
    teachers = columns(load_study(ROOT / "studies" / "sweep_teacher_arch.yaml"))
    assert len(teachers["teacher.arch"]) >= 2


def test_rd3_imagenet1k_uses_torchvisions_pretrained_resnet18_as_rd3_does(data_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))  # validating needs no weights file
    study = load_study(ROOT / "studies" / "rd3_imagenet1k.yaml")
    [teacher] = study.spec.teachers
    assert (teacher.arch, teacher.weights, teacher.source) == ("resnet18", "torchvision:ResNet18_Weights.IMAGENET1K_V1",
                                                               "torchvision")
    from orchestrator.study.expand import expand
    cells = expand(study)
    assert {c.config["teachers"][0]["source"]["file"] for c in cells if c.teachers} == {"resnet18-f37072fd.pth"}


def test_a_study_without_its_data_says_where_to_give_it(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("RD3_DATA_CIFAR10", raising=False)
    path = ROOT / "studies" / "rd3_cifar10.yaml"
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{path}:" in err and "dataset.root" in err and "RD3_DATA_CIFAR10" in err and "--data PATH" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
    assert main(["validate", str(path), "--data", str(tmp_path / "missing")]) == 2
    assert f"{tmp_path / 'missing'} does not exist" in capsys.readouterr().err


def image_folder(root: Path, classes: int = 10, train: int = 2, test: int = 1) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("test", test)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


TINY_CIFAR = """\
name: tiny_cifar
dataset: {name: cifar10}
methods:
  - {name: random_real, ipc: 1}
protocol:
  overrides: {student: convnet3-w8, epochs: 1, batch_size: 10, labels: {mode: hard}, eval: {interval: 0}}
"""


def test_run_finds_the_data_given_by_data(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("RD3_DATA_CIFAR10", raising=False)
    monkeypatch.setenv("RD3_CACHE", str(tmp_path / "cache"))  # the decoded-dataset cache
    study = tmp_path / "tiny_cifar.yaml"
    study.write_text(TINY_CIFAR)
    tree = image_folder(tmp_path / "cifar")
    out = tmp_path / "out"
    assert main(["run", str(study), "--out", str(out), "--executor", "local", "--data", str(tree)]) == 0
    assert "1 cells, 0 already done, 1 to run" in capsys.readouterr().out
    # The location is not part of the cell's identity: the same results, found again.
    monkeypatch.setenv("RD3_DATA_CIFAR10", str(tree))
    assert main(["run", str(study), "--out", str(out), "--executor", "local"]) == 0
    assert "1 cells, 1 already done, 0 to run" in capsys.readouterr().out
