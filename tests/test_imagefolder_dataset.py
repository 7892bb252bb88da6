"""The `imagefolder` dataset: a user's own ImageFolder tree (or .tar.gz of one)
whose facts (classes, size, mean/std, family) are read from the data; it
validates, runs, keeps its identity apart from other trees, and a tree that
breaks the rules is a clear study error at dataset.root."""
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from db.queries import results_frame
from db.session import make_engine
from orchestrator.cli import main
from orchestrator.study.expand import expand
from orchestrator.study.spec import load_study
from rd3core.data import dataset_info, family_for_size, list_datasets, load_dataset

CLASSES = ("daisy", "rose", "tulip")
STUDY = """\
name: {name}
dataset: {dataset}
methods:
  - {{name: random_real, ipc: 1}}
protocol:
  overrides: {{student: convnet3-w8, epochs: 1, batch_size: 3, labels: {{mode: hard}}, eval: {{interval: 0}}}}
"""


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RD3_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("RD3_DATA_IMAGEFOLDER", raising=False)


def tree(root: Path, classes=CLASSES, test_classes=None, side=16, train=3, test=2, seed=0, odd=None) -> Path:
    """Random PNGs in train/<class>/ and test/<class>/; ``odd`` = (w, h) of one train image."""
    rng = np.random.default_rng(seed)
    for split, n, names in (("train", train, classes), ("test", test, test_classes or classes)):
        for c in names:
            folder = root / split / c
            folder.mkdir(parents=True)
            for i in range(n):
                w, h = odd if odd and split == "train" and (c, i) == (names[0], 0) else (side, side)
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def tarball(folder: Path) -> Path:
    path = folder.with_name(folder.name + ".tar.gz")
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)  # the layout of cifar10-jpeg.tar.gz, under one top folder
    return path


def study_file(tmp_path: Path, dataset: str, name: str = "flowers") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(STUDY.format(name=name, dataset=dataset))
    return path


def test_listed_and_its_facts_are_read_from_the_data(tmp_path):
    assert "imagefolder" in list_datasets()
    folder = tree(tmp_path / "flowers")
    info = dataset_info("imagefolder", str(folder))
    assert (info.num_classes, info.channels, info.size, info.family, info.resize, info.stream) == (
        3, 3, 16, "cifar", 0, False)
    assert info.test_transform == "resize short side to 16, centre crop 16"
    pixels = np.stack([np.asarray(Image.open(p)) for p in sorted(folder.glob("train/*/*.png"))]) / 255.0
    assert info.mean == pytest.approx(pixels.mean(axis=(0, 1, 2)), abs=1e-4)
    assert info.std == pytest.approx(pixels.std(axis=(0, 1, 2)), abs=1e-4)
    data = load_dataset("imagefolder", str(folder))
    assert data.info == info and data.classes == CLASSES
    assert data.train.images.shape == (9, 3, 16, 16) and len(data.test) == 6
    # A tarball of the same tree: the same facts, the same content digest.
    packed = dataset_info("imagefolder", str(tarball(folder)))
    assert (packed.num_classes, packed.size, packed.mean, packed.std) == (3, 16, info.mean, info.std)
    assert len(info.digest) == 16 and packed.digest == info.digest
    assert load_dataset("imagefolder", str(tarball(folder))).classes == CLASSES
    assert [family_for_size(s) for s in (16, 32, 33, 64, 65, 224)] == ["cifar", "cifar", "tiny", "tiny",
                                                                       "imagenet", "imagenet"]
    assert dataset_info("imagefolder", str(tree(tmp_path / "big", side=40, train=1, test=1))).family == "tiny"


def test_validate_a_folder_and_a_tarball(tmp_path, capsys):
    folder = tree(tmp_path / "flowers")
    assert main(["validate", str(study_file(tmp_path, f"{{name: imagefolder, root: {folder}}}"))]) == 0
    assert "ok (1 cells" in capsys.readouterr().out
    bare = study_file(tmp_path, "{name: imagefolder}", "bare")
    assert main(["validate", str(bare), "--data", str(tarball(folder))]) == 0
    assert "ok (1 cells" in capsys.readouterr().out


def test_cells_are_keyed_by_the_data_not_its_location(tmp_path, monkeypatch):
    bare = study_file(tmp_path, "{name: imagefolder}", "bare")

    def key(root: Path) -> str:
        monkeypatch.setenv("RD3_DATA_IMAGEFOLDER", str(root))
        cells = expand(load_study(bare))
        assert cells[0].config["dataset"]["digest"] == dataset_info("imagefolder").digest
        return cells[0].key

    first = tree(tmp_path / "t0")
    keys = [key(first), key(tarball(first)), key(tree(tmp_path / "t1", seed=1))]
    # Same pixels as a tarball: the same cell; another tree (same names and file
    # sizes, other pixels) under the same study text: other cells and stages.
    assert keys[0] == keys[1] != keys[2]
    image = first / "train" / "rose" / "0.png"
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(image)  # rewritten in place
    assert key(first) not in keys


def test_run_records_one_result(tmp_path, capsys):
    folder = tree(tmp_path / "flowers")
    study = study_file(tmp_path, "{name: imagefolder}")
    out = tmp_path / "out"
    assert main(["run", str(study), "--out", str(out), "--executor", "local", "--data", str(tarball(folder))]) == 0
    assert "1 cells, 0 already done, 1 to run" in capsys.readouterr().out
    frame = results_frame(make_engine(f"sqlite:///{out / 'rd3.sqlite'}"), "flowers")
    assert len(frame) == 1 and 0 <= frame["top1"].iloc[0] <= 1


@pytest.mark.parametrize("kind", ["mismatch", "not_square", "mixed_sizes"])
def test_a_bad_tree_is_a_study_error_at_dataset_root(kind, tmp_path, capsys):
    if kind == "mismatch":
        folder = tree(tmp_path / "bad", test_classes=("daisy", "rose", "tulips"))
        wanted = ["test/ must hold the same class folders", "only in ", "train/: tulip;", "test/: tulips)"]
    else:
        folder = tree(tmp_path / "bad", odd=(16, 20) if kind == "not_square" else (24, 24))
        wanted = ["every train image must be square and of one size", "resize them",
                  "16x20 (1, e.g. " if kind == "not_square" else "24x24 (1, e.g. ", "train/daisy/0.png)"]
    for root in (folder, tarball(folder)):
        study = study_file(tmp_path, f"{{name: imagefolder, root: {root}}}")
        assert main(["validate", str(study)]) == 2
        err = capsys.readouterr().err
        assert f"{study}:2: dataset.root:" in err, err
        assert all(w in err for w in wanted), err
        assert "Traceback" not in err
    study = study_file(tmp_path, "{name: imagefolder}", "bare")
    assert main(["run", str(study), "--out", str(tmp_path / "out"), "--data", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "dataset.root" in err and wanted[0] in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
